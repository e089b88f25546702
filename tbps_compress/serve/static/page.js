// The search page of tbps-compress serve: no external script, style or font; everything comes from this server.
// Images are fetched with the bearer token (when one is entered) and shown from blob: URLs.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("search-form"), grid = $("grid"), statusLine = $("status"), tokenInput = $("token");
  const viewer = $("viewer"), viewerImg = $("viewer-img"), viewerCaption = $("viewer-caption");
  let blobUrls = [];

  tokenInput.value = sessionStorage.getItem("tbps-token") || "";
  tokenInput.addEventListener("change", () => sessionStorage.setItem("tbps-token", tokenInput.value.trim()));

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const token = tokenInput.value.trim();
    if (token) h["Authorization"] = "Bearer " + token;
    return h;
  }

  function say(text, isError) {
    statusLine.textContent = text;
    statusLine.className = isError ? "error" : "";
  }

  async function imageUrl(path) {
    const resp = await fetch(path, {headers: headers()});
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    const url = URL.createObjectURL(await resp.blob());
    blobUrls.push(url);
    return url;
  }

  function meta(hit) {
    const parts = [];
    if (hit.identity !== undefined) parts.push("id " + hit.identity);
    if (hit.camera !== undefined) parts.push("camera " + hit.camera);
    return parts.join(" · ");
  }

  function label(hit) {
    const m = meta(hit);
    return m ? hit.path + " · " + m : hit.path;
  }

  function render(data) {
    blobUrls.forEach((u) => URL.revokeObjectURL(u));
    blobUrls = [];
    grid.replaceChildren();
    for (const hit of data.results) {
      const fig = document.createElement("figure");
      fig.className = "hit";
      fig.dataset.rank = hit.rank;
      fig.dataset.path = hit.path;
      fig.dataset.id = hit.id;
      fig.tabIndex = 0;
      const img = document.createElement("img");
      img.alt = hit.path;
      const cap = document.createElement("figcaption");
      const rank = document.createElement("span");
      rank.className = "rank";
      rank.textContent = "#" + hit.rank + " ";
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = hit.score.toFixed(3);
      const path = document.createElement("div");
      path.className = "path";
      path.textContent = hit.path;
      cap.append(rank, score, path);
      if (meta(hit)) {
        const m = document.createElement("div");
        m.className = "meta";
        m.textContent = meta(hit);
        cap.append(m);
      }
      fig.append(img, cap);
      fig.addEventListener("click", () => openViewer(hit));
      fig.addEventListener("keydown", (e) => { if (e.key === "Enter") openViewer(hit); });
      grid.append(fig);
      imageUrl(hit.thumbnail).then((u) => { img.src = u; }).catch(() => { img.alt = "thumbnail unavailable"; });
    }
    const n = data.results.length;
    say(n + " result" + (n === 1 ? "" : "s") + " of " + data.gallery_size + " images in " +
        data.search_ms.toFixed(1) + " ms", false);
  }

  async function openViewer(hit) {
    viewerCaption.textContent = "#" + hit.rank + "  " + hit.score.toFixed(4) + "  " + label(hit);
    viewerImg.removeAttribute("src");
    viewerImg.alt = hit.path;
    viewer.hidden = false;
    try {
      viewerImg.src = await imageUrl(hit.image);
    } catch (err) {
      viewerCaption.textContent = "cannot load the image (" + err.message + ")";
    }
  }

  function closeViewer() { viewer.hidden = true; }
  viewer.addEventListener("click", closeViewer);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeViewer(); });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = $("query").value;
    if (!text.trim()) { say("type a description of the person first", true); return; }
    say("searching…", false);
    try {
      const resp = await fetch("/search", {
        method: "POST",
        headers: headers({"Content-Type": "application/json"}),
        body: JSON.stringify({text: text, k: parseInt($("k").value, 10)}),
      });
      const data = await resp.json().catch(() => ({error: "HTTP " + resp.status}));
      if (!resp.ok) {
        if (resp.status === 401) $("token-box").open = true;
        say(data.error || ("HTTP " + resp.status), true);
        return;
      }
      render(data);
    } catch (err) {
      say("the server did not answer (" + err.message + ")", true);
    }
  });
})();
