"""SynthPedes drawing: a person from their attributes with Pillow, scenes, occluders and camera effects."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageEnhance, ImageFilter

from .attributes import _RGB, VIEWS, sample_identity
from .captions import (
    COLOURS,
)
from .scenes import _GROUNDS

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]


def _mul(rgb: Sequence[int], f: float) -> RGB:
    return (min(255, max(0, int(rgb[0] * f))), min(255, max(0, int(rgb[1] * f))), min(255, max(0, int(rgb[2] * f))))


def _mix(a: Sequence[int], b: Sequence[int], t: float) -> RGB:
    return (int(a[0] + (b[0] - a[0]) * t), int(a[1] + (b[1] - a[1]) * t), int(a[2] + (b[2] - a[2]) * t))


class _Pen:
    """Draws in person units (person height = 1, u to the right of the body axis, v down from the head top)."""

    def __init__(self, img: Image.Image, cx: float, top: float, scale: float) -> None:
        self.img = img
        self.draw = ImageDraw.Draw(img)
        self.cx, self.top, self.s = cx, top, scale
        self.mask: ImageDraw.ImageDraw | None = None
        self.tilt = 0.0
        self._cos, self._sin = 1.0, 0.0

    def set_tilt(self, degrees: float) -> None:
        """Rotate everything drawn afterwards by ``degrees`` (clockwise) about the soles."""
        self.tilt = degrees
        self._cos, self._sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))

    def xy(self, u: float, v: float) -> tuple[float, float]:
        x, y = u * self.s, (v - 1.0) * self.s
        return (self.cx + x * self._cos - y * self._sin, self.top + self.s + x * self._sin + y * self._cos)

    @staticmethod
    def _c(fill: Sequence[int]) -> tuple[int, int, int, int]:
        return (int(fill[0]), int(fill[1]), int(fill[2]), 255)

    def poly(self, pts: Sequence[tuple[float, float]], fill: Sequence[int], mask: bool = False) -> None:
        xy = [self.xy(u, v) for u, v in pts]
        self.draw.polygon(xy, fill=self._c(fill))
        if mask and self.mask is not None:
            self.mask.polygon(xy, fill=255)

    def _box(self, u: float, v: float, ru: float, rv: float) -> list[float]:
        x, y = self.xy(u, v)
        rx, ry = abs(ru) * self.s, abs(rv) * self.s
        return [x - rx, y - ry, x + rx, y + ry]

    def ellipse(self, u: float, v: float, ru: float, rv: float, fill: Sequence[int] | None,
                outline: Sequence[int] | None = None, width: float = 0.0, mask: bool = False) -> None:
        box = self._box(u, v, ru, rv)
        w = max(1, int(round(width * self.s))) if outline is not None else 0
        self.draw.ellipse(box, fill=None if fill is None else self._c(fill),
                          outline=None if outline is None else self._c(outline), width=w)
        if mask and self.mask is not None and fill is not None:
            self.mask.ellipse(box, fill=255)

    def chord(self, u: float, v: float, ru: float, rv: float, start: float, end: float,
              fill: Sequence[int]) -> None:
        start, end = start + self.tilt, end + self.tilt
        self.draw.chord(self._box(u, v, ru, rv), start, end, fill=self._c(fill))

    def rect(self, u0: float, v0: float, u1: float, v1: float, fill: Sequence[int], mask: bool = False) -> None:
        self.poly([(u0, v0), (u1, v0), (u1, v1), (u0, v1)], fill, mask)

    def line(self, pts: Sequence[tuple[float, float]], fill: Sequence[int], width: float) -> None:
        self.draw.line([self.xy(u, v) for u, v in pts], fill=self._c(fill), width=max(1, int(round(width * self.s))))

    def limb(self, pts: Sequence[tuple[float, float]], widths: Sequence[float], fill: Sequence[int],
             mask: bool = False) -> None:
        """A thick polyline with a width per joint and rounded joints."""
        for (u0, v0), (u1, v1), w0, w1 in zip(pts[:-1], pts[1:], widths[:-1], widths[1:], strict=False):
            du, dv = u1 - u0, v1 - v0
            n = math.hypot(du, dv) or 1e-6
            nu, nv = -dv / n, du / n
            self.poly([(u0 + nu * w0 / 2, v0 + nv * w0 / 2), (u1 + nu * w1 / 2, v1 + nv * w1 / 2),
                       (u1 - nu * w1 / 2, v1 - nv * w1 / 2), (u0 - nu * w0 / 2, v0 - nv * w0 / 2)], fill, mask)
        for (u, v), w in zip(pts, widths, strict=False):
            self.ellipse(u, v, w / 2, w / 2, fill, mask=mask)


def _arm_points(shoulder: tuple[float, float], angle: float, bend: float, side: float,
                upper: float = 0.165, fore: float = 0.15) -> list[tuple[float, float]]:
    su, sv = shoulder
    eu, ev = su + side * upper * math.sin(angle), sv + upper * math.cos(angle)
    hu, hv = eu + side * fore * math.sin(angle + bend), ev + fore * math.cos(angle + bend)
    return [(su, sv), (eu, ev), (hu, hv)]


def _along(pts: Sequence[tuple[float, float]], frac: float) -> list[tuple[float, float]]:
    """The first ``frac`` of a polyline (by length)."""
    lengths = [math.dist(a, b) for a, b in zip(pts[:-1], pts[1:], strict=False)]
    target = frac * sum(lengths)
    out = [pts[0]]
    for (a, b), seg in zip(zip(pts[:-1], pts[1:], strict=False), lengths, strict=False):
        if target <= seg:
            t = target / seg if seg else 0.0
            out.append((a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t))
            return out
        out.append(b)
        target -= seg
    return out


class _Person:
    """Everything needed to draw one identity in one image."""

    def __init__(self, attrs: dict[str, str], extras: dict[str, Any], view: str, facing: str,
                 rng: np.random.Generator) -> None:
        self.a, self.e, self.view, self.facing, self.rng = attrs, extras, view, facing, rng
        build, gender = attrs["body"].split()
        self.female = gender == "female"
        bw = {"slim": 0.88, "average": 1.0, "heavy": 1.2}[build] * extras["width"]
        self.bw = bw
        self.sw = (0.1 if self.female else 0.115) * (0.5 + 0.5 * bw)
        self.ww = (0.07 if self.female else 0.083) * bw
        self.hw = (0.097 if self.female else 0.09) * bw
        self.leg_w = (0.07 if self.female else 0.076) * (0.55 + 0.45 * bw)
        rgb = extras["rgb"]
        self.skin = tuple(extras["skin"])
        self.hair = tuple(extras["hair_rgb"])
        self.c1, self.c2 = tuple(rgb["upper"]), tuple(rgb["upper2"])
        self.lower, self.shoe = tuple(rgb["lower"]), tuple(rgb["shoe"])
        self.bag, self.hat = tuple(rgb["bag"]), tuple(rgb["hat"])
        self.held_rgb = _RGB[extras["held_color"]]
        self.stride = float(rng.uniform(0.0, 1.0))
        self.spread = float(rng.uniform(0.0, 0.05))
        self.arm_out = math.radians(float(rng.uniform(3, 13)))
        self.swing = float(rng.uniform(-1, 1))
        hem = {"t-shirt": 0.51, "tank top": 0.5, "shirt": 0.52, "sweater": 0.51, "hoodie": 0.525, "jacket": 0.52,
               "coat": 0.8, "dress": 0.7}
        self.hem = hem[attrs["upper_type"]]
        if attrs["upper_type"] == "coat" and attrs["lower_type"] in ("long skirt",):
            self.hem = 0.78

    # which image side (+1 right / -1 left, in drawing units) a body side appears on
    def side_sign(self, body_side: str) -> float:
        s = -1.0 if body_side == "right" else 1.0
        return s if self.view == "front" else -s

    # ------------------------------------------------------------------------------------------------------------
    def draw(self, pen: _Pen) -> None:
        if self.view == "side":
            self._draw_side(pen)
        else:
            self._draw_frontal(pen)

    # ---- shared pieces -----------------------------------------------------------------------------------------
    def _shoe(self, pen: _Pen, u: float, v: float, forward: float) -> None:
        """A shoe whose sole is at v; ``forward`` is 0 for frontal views, +1 facing right in side views."""
        kind, c = self.a["shoe_type"], self.shoe
        length = 0.034 if forward == 0 else 0.055
        off = forward * 0.022
        if kind == "boots":
            pen.rect(u - 0.027, v - 0.12, u + 0.027, v - 0.02, c)
        if kind == "sandals":
            pen.ellipse(u + off, v - 0.018, length, 0.016, self.skin)
            for dv in (0.028, 0.012):
                pen.line([(u + off - length * 0.8, v - dv), (u + off + length * 0.8, v - dv)], c, 0.007)
            pen.rect(u + off - length, v - 0.005, u + off + length, v, _mul(c, 0.7))
            return
        pen.ellipse(u + off, v - 0.02, length, 0.021, c)
        if kind == "sneakers":
            sole = (235, 235, 230) if sum(c) < 600 else (150, 150, 150)
            pen.rect(u + off - length * 0.95, v - 0.009, u + off + length * 0.95, v, sole)
        elif kind == "leather shoes":
            pen.ellipse(u + off + length * 0.3 * (forward or 0.5), v - 0.027, length * 0.35, 0.006, _mix(c, (255,) * 3,
                                                                                                        0.45))
            pen.rect(u + off - length * 0.9, v - 0.006, u + off + length * 0.9, v, _mul(c, 0.55))
        else:  # boots
            pen.rect(u + off - length, v - 0.008, u + off + length, v, _mul(c, 0.6))

    def _lower_legs(self, pen: _Pen, legs: list[list[tuple[float, float]]], shades: list[float],
                    forward: float) -> None:
        """Skin, lower garment and shoes on each leg (drawn far leg first)."""
        kind, c = self.a["lower_type"], self.lower
        lw = self.leg_w
        dress = self.a["upper_type"] == "dress"
        for pts, sh in zip(legs, shades, strict=False):
            skin = _mul(self.skin, sh)
            pen.limb(pts, [lw, lw * 0.72, lw * 0.55], skin)
            if not dress:
                if kind in ("trousers", "jeans"):
                    extra = 0.012 if kind == "trousers" else 0.004
                    col = _mul(c, sh)
                    pen.limb(pts, [lw + extra + 0.006, lw * 0.74 + extra, lw * 0.58 + extra], col)
                    if kind == "jeans":
                        pen.limb(_along(pts, 0.55), [lw * 0.35, lw * 0.25], _mix(col, (255, 255, 255), 0.16))
                        pen.line(pts, _mix(col, (230, 190, 120), 0.35), 0.004)
                    else:
                        pen.line(_along(pts, 0.98), _mul(col, 0.82), 0.003)
                elif kind == "shorts":
                    pen.limb(_along(pts, 0.42), [lw + 0.02, lw + 0.016], _mul(c, sh))
            ankle = pts[-1]
            self._shoe(pen, ankle[0], ankle[1] + 0.045, forward)

    def _pelvis(self, pen: _Pen, width: float, front: float = 0.0, back: float = 0.0) -> None:
        kind, c = self.a["lower_type"], self.lower
        if self.a["upper_type"] == "dress":
            return
        if kind in ("trousers", "jeans", "shorts"):
            if self.view == "side":
                pen.poly([(back, 0.44), (front, 0.44), (front + 0.005, 0.56), (back - 0.005, 0.56)], c)
            else:
                pen.poly([(-width, 0.44), (width, 0.44), (width * 1.02, 0.56), (0.0, 0.57), (-width * 1.02, 0.56)], c)
            if kind == "jeans" and self.view != "side":
                pen.line([(-width * 0.95, 0.47), (width * 0.95, 0.47)], _mul(c, 0.75), 0.004)

    def _skirt(self, pen: _Pen, top_w: tuple[float, float], bottom: float, bottom_w: tuple[float, float],
               fill: RGB, mask: bool = False) -> None:
        (t0, t1), (b0, b1) = top_w, bottom_w
        pen.poly([(t0, 0.43), (t1, 0.43), (b1, bottom), ((b0 + b1) / 2, bottom + 0.012), (b0, bottom)], fill, mask)

    def _hand_item(self, pen: _Pen, hand: tuple[float, float], item: str, outward: float) -> None:
        u, v = hand
        if item == "handbag":
            c = self.bag
            pen.line([(u - 0.02, v + 0.03), (u, v - 0.005), (u + 0.02, v + 0.03)], _mul(c, 0.7), 0.006)
            pen.poly([(u - 0.045, v + 0.03), (u + 0.045, v + 0.03), (u + 0.055, v + 0.1), (u - 0.055, v + 0.1)], c)
            pen.line([(u - 0.045, v + 0.045), (u + 0.045, v + 0.045)], _mul(c, 0.75), 0.004)
        elif item == "umbrella":
            c = self.held_rgb
            pen.line([(u, v + 0.01), (u, v - 0.03), (u + outward * 0.02, v - 0.045)], (40, 30, 25), 0.008)
            pen.poly([(u - 0.018, v + 0.02), (u + 0.018, v + 0.02), (u + 0.006, v + 0.36), (u - 0.006, v + 0.36)], c)
            pen.line([(u, v + 0.36), (u, v + 0.4)], (60, 60, 60), 0.005)
        elif item == "cup":
            lid = (240, 240, 240) if self.rng.random() < 0.5 else (60, 40, 30)
            pen.poly([(u - 0.016, v - 0.022), (u + 0.016, v - 0.022), (u + 0.012, v + 0.022), (u - 0.012, v + 0.022)],
                     (236, 232, 222) if lid[0] < 100 else (150, 100, 60))
            pen.rect(u - 0.018, v - 0.03, u + 0.018, v - 0.02, lid)
        elif item == "bottle":
            pen.rect(u - 0.012, v - 0.04, u + 0.012, v + 0.035, (170, 210, 235))
            pen.rect(u - 0.006, v - 0.052, u + 0.006, v - 0.04, (40, 90, 190))
        elif item == "phone":
            pen.rect(u - 0.014, v - 0.03, u + 0.014, v + 0.012, (20, 20, 24))
            pen.rect(u - 0.01, v - 0.026, u + 0.01, v + 0.008, (70, 90, 120))

    def _pattern(self, pen: _Pen, mask_img: Image.Image, view: str) -> None:
        """Stripes / checks / colour blocks over the upper garment (mask_img holds its silhouette)."""
        pattern = self.a["upper_pattern"]
        if pattern not in ("striped", "checked", "two-tone"):
            return
        m = np.asarray(mask_img) > 0
        if not m.any():
            return
        h, w = m.shape
        period = max(2, int(self.e["stripe"] * pen.s))
        yy = np.arange(h)[:, None] - int(pen.top)
        xx = np.arange(w)[None, :]
        if pattern == "striped":
            sel = ((yy // period) % 2 == 0) & np.ones((1, w), bool)
        elif pattern == "checked":
            p = max(3, int(period * 1.3))
            sel = ((yy // p) % 3 == 0) | ((xx // p) % 3 == 0)
        else:
            split = int(pen.top + 0.3 * pen.s)
            sel = (yy + int(pen.top) < split) & np.ones((1, w), bool)
        sel = sel & m
        pen.img.paste(Image.new("RGBA", (w, h), pen._c(self.c2)), (0, 0), Image.fromarray(sel.astype(np.uint8) * 255))

    # ---- frontal views -------------------------------------------------------------------------------------
    def _draw_frontal(self, pen: _Pen) -> None:
        a, front = self.a, self.view == "front"
        sw, ww, hw = self.sw, self.ww, self.hw
        up = a["upper_type"]
        hair_style = a["hair_style"]
        mask_img = Image.new("L", pen.img.size, 0)

        # things behind the body
        if front and hair_style in ("long", "medium"):
            bottom = 0.3 if hair_style == "long" else 0.165
            pen.ellipse(0, 0.06, 0.064, 0.058, self.hair)
            pen.rect(-0.064, 0.06, 0.064, bottom, self.hair)
        if front and a["bag"] == "backpack":
            pen.rect(-(sw + 0.012), 0.21, sw + 0.012, 0.44, _mul(self.bag, 0.8))

        # legs
        step = self.stride * 0.02
        hip_u = 0.045 * self.bw
        legs = []
        for s, lift in ((-1, step), (1, 0.0)):
            legs.append([(s * hip_u, 0.52), (s * (hip_u + self.spread * 0.4), 0.735 - lift / 2),
                         (s * (hip_u + self.spread), 0.955 - lift)])
        if self.rng.random() < 0.5:
            legs.reverse()
        self._lower_legs(pen, legs, [1.0, 1.0], 0.0)
        self._pelvis(pen, hw * 1.04)
        if up != "dress" and a["lower_type"] == "skirt":
            self._skirt(pen, (-ww * 1.1, ww * 1.1), 0.67, (-(hw * 1.35 + self.spread), hw * 1.35 + self.spread),
                        self.lower)
        if up != "dress" and a["lower_type"] == "long skirt":
            self._skirt(pen, (-ww * 1.1, ww * 1.1), 0.93, (-(hw * 1.55 + self.spread), hw * 1.55 + self.spread),
                        self.lower)

        # arms: decide poses first (the phone arm is bent up to the chest)
        held, bag = a["held"], a["bag"]
        held_s = self.side_sign(self.e["held_side"])
        bag_s = self.side_sign(self.e["bag_side"])
        arms: dict[float, list[tuple[float, float]]] = {}
        for s in (-1.0, 1.0):
            shoulder = (s * (sw - 0.018), 0.195)
            angle = self.arm_out + 0.06 * self.swing * s
            if held == "phone" and s == held_s:
                elbow = (s * (sw + 0.015), 0.34)
                hand = (s * sw * 0.35, 0.3) if front else (s * sw * 0.6, 0.33)
                arms[s] = [shoulder, elbow, hand]
            else:
                bend = 0.05 if (bag == "handbag" and s == bag_s) else float(self.rng.uniform(-0.1, 0.15))
                arms[s] = _arm_points(shoulder, angle, bend, s)

        # torso garment
        neck_bottom = 0.175
        garment = self.c1
        pen.mask = ImageDraw.Draw(mask_img)
        if up == "tank top":
            pen.limb([(0, 0.2), (0, 0.2)], [0.02, 0.02], self.skin)
            pen.poly([(-sw + 0.005, 0.18), (sw - 0.005, 0.18), (sw - 0.012, 0.24), (ww + 0.006, 0.34),
                      (hw + 0.004, self.hem), (-hw - 0.004, self.hem), (-ww - 0.006, 0.34), (-sw + 0.012, 0.24)],
                     self.skin)
            pen.poly([(-sw + 0.035, 0.2), (sw - 0.035, 0.2), (ww + 0.01, 0.3), (ww + 0.006, 0.36),
                      (hw + 0.006, self.hem), (-hw - 0.006, self.hem), (-ww - 0.006, 0.36), (-ww - 0.01, 0.3)],
                     garment, mask=True)
            for s in (-1, 1):
                pen.line([(s * (sw - 0.045), 0.175), (s * (sw - 0.03), 0.215)], garment, 0.012)
        else:
            hem_main = min(self.hem, 0.525)
            pen.poly([(-sw + 0.03, neck_bottom), (sw - 0.03, neck_bottom), (sw, 0.2), (ww + 0.012, 0.33), (ww, 0.42),
                      (hw + 0.008, hem_main), (0, hem_main + 0.006), (-hw - 0.008, hem_main), (-ww, 0.42),
                      (-ww - 0.012, 0.33), (-sw, 0.2)], garment, mask=True)
            for s in (-1, 1):
                pen.ellipse(s * (sw - 0.025), 0.205, 0.03, 0.03, garment, mask=True)
            if up == "coat":
                self._skirt(pen, (-hw - 0.01, hw + 0.01), self.hem,
                            (-(hw * 1.3 + self.spread * 0.6), hw * 1.3 + self.spread * 0.6), garment, mask=True)
            elif up == "dress":
                self._skirt(pen, (-ww - 0.005, ww + 0.005), self.hem,
                            (-(hw * 1.5 + self.spread), hw * 1.5 + self.spread), garment, mask=True)
        # sleeves and arms (arms drawn after the torso, hanging beside it)
        sleeve_frac = {"t-shirt": 0.38, "tank top": 0.0, "dress": 0.2 if self.e["logo"] % 2 else 0.0}.get(up, 1.0)
        sleeve_col = self.c2 if self.a["upper_pattern"] == "two-tone" else garment
        hidden_phone_arm = (not front) and held == "phone"
        for s, pts in arms.items():
            arm_pts = pts if not (hidden_phone_arm and s == held_s) else _along(pts, 0.55)
            pen.limb(arm_pts, [0.05, 0.042, 0.036][: len(arm_pts)], self.skin)
            if sleeve_frac > 0:
                sl = _along(arm_pts, min(1.0, sleeve_frac + (0.0 if arm_pts is pts else 0.4)))
                pen.limb(sl, [0.064, 0.056, 0.05][: len(sl)], sleeve_col,
                         mask=self.a["upper_pattern"] != "two-tone")
                if up == "sweater" and sleeve_frac >= 1.0 and arm_pts is pts:
                    cuff = _along(pts, 0.97)[-1]
                    pen.ellipse(cuff[0], cuff[1], 0.024, 0.016, _mul(sleeve_col, 0.82))
            if arm_pts is pts:
                pen.ellipse(pts[-1][0], pts[-1][1] + 0.012, 0.02, 0.024, self.skin)
        pen.mask = None
        self._pattern(pen, mask_img, self.view)

        # garment details
        dark = _mul(garment, 0.72)
        if front:
            if up == "t-shirt" or up == "dress":
                pen.chord(0, neck_bottom - 0.004, 0.032, 0.022, 0, 180, self.skin)
            elif up == "shirt":
                pen.poly([(-0.035, 0.17), (0, 0.2), (-0.012, 0.215), (-0.04, 0.18)], _mix(garment, (255,) * 3, 0.2))
                pen.poly([(0.035, 0.17), (0, 0.2), (0.012, 0.215), (0.04, 0.18)], _mix(garment, (255,) * 3, 0.2))
                for i in range(5):
                    pen.ellipse(0, 0.23 + i * 0.06, 0.005, 0.005, dark)
            elif up == "sweater":
                pen.chord(0, neck_bottom - 0.004, 0.034, 0.024, 0, 180, dark)
                pen.rect(-hw - 0.006, self.hem - 0.03, hw + 0.006, self.hem, dark)
            elif up == "hoodie":
                pen.ellipse(0, 0.175, 0.06, 0.025, dark)
                for s in (-1, 1):
                    pen.line([(s * 0.018, 0.185), (s * 0.02, 0.27)], (230, 230, 230), 0.004)
                pen.poly([(-0.06, 0.4), (0.06, 0.4), (0.075, 0.49), (-0.075, 0.49)], _mul(garment, 0.85))
            elif up in ("jacket", "coat"):
                bottom = 0.5 if up == "jacket" else 0.45
                pen.poly([(-0.03, 0.175), (0.03, 0.175), (0.022, bottom), (-0.022, bottom)], self.c2)
                pen.line([(-0.024, 0.2), (-0.024, self.hem - 0.005)], dark, 0.006)
                pen.line([(0.024, 0.2), (0.024, self.hem - 0.005)], dark, 0.006)
                pen.poly([(-0.045, 0.17), (-0.012, 0.2), (-0.03, 0.28)], dark)
                pen.poly([(0.045, 0.17), (0.012, 0.2), (0.03, 0.28)], dark)
                if up == "coat":
                    for i in range(3):
                        pen.ellipse(-0.04, 0.32 + i * 0.08, 0.006, 0.006, dark)
                        pen.ellipse(0.04, 0.32 + i * 0.08, 0.006, 0.006, dark)
                    pen.rect(-hw - 0.01, 0.44, hw + 0.01, 0.46, dark)
            if a["upper_pattern"] == "logo":
                self._logo(pen, 0.0, 0.28)
        else:
            if up == "hoodie":
                pen.poly([(-0.07, 0.17), (0.07, 0.17), (0.05, 0.27), (0, 0.295), (-0.05, 0.27)], dark)
            elif up in ("shirt", "jacket", "coat"):
                pen.line([(-sw + 0.02, 0.24), (sw - 0.02, 0.24)], dark, 0.004)
                if up == "coat":
                    pen.line([(0, 0.5), (0, self.hem)], dark, 0.005)
            elif up == "sweater":
                pen.rect(-hw - 0.006, self.hem - 0.03, hw + 0.006, self.hem, dark)

        # neck and head
        pen.rect(-0.022, 0.11, 0.022, 0.18 if up not in ("hoodie", "coat", "jacket") else 0.172, self.skin)
        self._head_frontal(pen, front)
        if not front and a["bag"] == "backpack":
            c = self.bag
            pen.poly([(-(sw - 0.015), 0.22), (sw - 0.015, 0.22), (sw - 0.005, 0.47), (-(sw - 0.005), 0.47)], c)
            pen.ellipse(0, 0.22, sw - 0.015, 0.03, c)
            pen.rect(-0.055, 0.35, 0.055, 0.45, _mul(c, 0.78))
            pen.line([(-0.055, 0.35), (0.055, 0.35)], _mul(c, 0.55), 0.004)

        # straps and bags over the body
        if front and a["bag"] == "backpack":
            for s in (-1, 1):
                pen.limb([(s * (sw - 0.045), 0.175), (s * (sw - 0.035), 0.3), (s * (sw - 0.03), 0.42)],
                         [0.022, 0.02, 0.018], self.bag)
        if a["bag"] == "shoulder bag":
            s = bag_s
            pen.line([(-s * (sw - 0.04), 0.175), (s * (hw + 0.02), 0.49)], _mul(self.bag, 0.75), 0.012)
            pen.poly([(s * (hw - 0.01), 0.47), (s * (hw + 0.09), 0.47), (s * (hw + 0.095), 0.585),
                      (s * (hw - 0.015), 0.585)], self.bag)
            pen.rect(s * (hw - 0.01), 0.47, s * (hw + 0.09), 0.505, _mul(self.bag, 0.8))
        for s, pts in arms.items():
            hand = (pts[-1][0], pts[-1][1] + 0.012)
            if a["bag"] == "handbag" and s == bag_s:
                self._hand_item(pen, hand, "handbag", s)
            if held != "none" and s == held_s and not (held == "phone" and not front):
                self._hand_item(pen, hand, held, s)
                pen.ellipse(hand[0], hand[1], 0.018, 0.02, self.skin)

    def _logo(self, pen: _Pen, u: float, v: float) -> None:
        kind, c = self.e["logo"], self.c2
        if kind == 0:
            pen.ellipse(u, v, 0.032, 0.032, c)
        elif kind == 1:
            pts = []
            for i in range(10):
                r = 0.038 if i % 2 == 0 else 0.016
                ang = math.pi * i / 5 - math.pi / 2
                pts.append((u + r * math.cos(ang), v + r * math.sin(ang)))
            pen.poly(pts, c)
        elif kind == 2:
            pen.rect(u - 0.045, v - 0.02, u + 0.045, v - 0.004, c)
            pen.rect(u - 0.03, v + 0.006, u + 0.03, v + 0.02, c)
        else:
            pen.poly([(u, v - 0.035), (u + 0.038, v + 0.028), (u - 0.038, v + 0.028)], c)

    def _head_frontal(self, pen: _Pen, front: bool) -> None:
        a = self.a
        style = a["hair_style"]
        hc, skin = self.hair, self.skin
        hr = 0.047 if self.female else 0.05
        if front:
            if style != "bald":
                pen.ellipse(0, 0.058, hr + 0.007, 0.062, hc)
                if style == "bun":
                    pen.ellipse(0, 0.0, 0.026, 0.022, hc)
            pen.ellipse(-hr, 0.075, 0.01, 0.016, _mul(skin, 0.92))
            pen.ellipse(hr, 0.075, 0.01, 0.016, _mul(skin, 0.92))
            pen.ellipse(0, 0.076, hr - 0.002, 0.056, skin)
            if style in ("short", "medium", "long", "ponytail", "bun"):
                pen.chord(0, 0.058, hr + 0.004, 0.052, 180, 360, hc)
            if style in ("medium", "long"):
                for s in (-1, 1):
                    pen.rect(s * (hr - 0.008), 0.06, s * (hr + 0.008), 0.13 if style == "medium" else 0.28, hc)
            eye = (40, 30, 30)
            if a["face_accessory"] != "sunglasses":
                pen.ellipse(-0.018, 0.074, 0.006, 0.004, eye)
                pen.ellipse(0.018, 0.074, 0.006, 0.004, eye)
            pen.line([(-0.012, 0.106), (0.012, 0.106)], _mul(skin, 0.65), 0.004)
            pen.line([(0, 0.08), (0.003, 0.093)], _mul(skin, 0.8), 0.003)
            acc = a["face_accessory"]
            if acc == "glasses":
                for s in (-1, 1):
                    pen.ellipse(s * 0.019, 0.074, 0.014, 0.011, None, outline=(25, 25, 25), width=0.004)
                pen.line([(-0.006, 0.073), (0.006, 0.073)], (25, 25, 25), 0.003)
            elif acc == "sunglasses":
                for s in (-1, 1):
                    pen.ellipse(s * 0.019, 0.075, 0.016, 0.012, (15, 15, 18))
                pen.line([(-0.008, 0.073), (0.008, 0.073)], (15, 15, 18), 0.004)
            elif acc == "face mask":
                m = self.e["mask_rgb"]
                pen.poly([(-0.04, 0.085), (0.04, 0.085), (0.034, 0.118), (0, 0.126), (-0.034, 0.118)], m)
                for s in (-1, 1):
                    pen.line([(s * 0.04, 0.088), (s * hr, 0.078)], _mul(m, 0.85), 0.003)
        else:
            if style == "bald":
                pen.ellipse(0, 0.068, hr, 0.066, skin)
            else:
                pen.ellipse(-hr, 0.078, 0.01, 0.016, _mul(skin, 0.92))
                pen.ellipse(hr, 0.078, 0.01, 0.016, _mul(skin, 0.92))
                pen.ellipse(0, 0.066, hr + 0.004, 0.064, hc)
                if style == "medium":
                    pen.rect(-hr - 0.006, 0.06, hr + 0.006, 0.16, hc)
                elif style == "long":
                    pen.rect(-hr - 0.01, 0.06, hr + 0.01, 0.3, hc)
                    pen.ellipse(0, 0.3, hr + 0.01, 0.02, hc)
                elif style == "ponytail":
                    pen.limb([(0, 0.08), (0.004, 0.17), (0, 0.24)], [0.03, 0.026, 0.012], _mul(hc, 0.92))
                elif style == "bun":
                    pen.ellipse(0, 0.03, 0.027, 0.024, _mul(hc, 0.92))
            if a["face_accessory"] == "face mask":
                pen.line([(-hr, 0.09), (hr, 0.09)], self.e["mask_rgb"], 0.004)
        self._hat(pen, 0.0, hr)

    def _hat(self, pen: _Pen, u: float, hr: float) -> None:
        hat, c = self.a["hat"], self.hat
        side = self.view == "side"
        if hat == "cap":
            pen.chord(u, 0.05, hr + 0.008, 0.046, 180, 360, c)
            if side:
                pen.poly([(u + 0.02, 0.045), (u + hr + 0.05, 0.05), (u + hr + 0.045, 0.058), (u + 0.02, 0.056)],
                         _mul(c, 0.8))
            elif self.view == "front":
                pen.ellipse(u, 0.05, hr + 0.004, 0.012, _mul(c, 0.8))
            else:
                pen.rect(u - 0.014, 0.04, u + 0.014, 0.05, _mul(self.skin, 0.9))
        elif hat == "beanie":
            pen.chord(u, 0.058, hr + 0.01, 0.058, 180, 360, c)
            pen.rect(u - hr - 0.01, 0.045, u + hr + 0.01, 0.064, _mul(c, 0.82))
        elif hat == "sun hat":
            pen.chord(u, 0.045, hr + 0.006, 0.044, 180, 360, c)
            pen.ellipse(u, 0.045, hr + 0.055, 0.016 if not side else 0.01, _mul(c, 0.9))
            pen.rect(u - hr - 0.004, 0.03, u + hr + 0.004, 0.04, _mul(c, 0.65))

    # ---- side view (drawn facing +u; the caller mirrors for facing left) -----------------------------------
    def _draw_side(self, pen: _Pen) -> None:
        a = self.a
        up = a["upper_type"]
        chest = 0.07 * self.bw
        back = -0.068 * self.bw
        belly = 0.012 * (self.bw - 1.0) * 5
        near_side = self.facing  # the body side that faces the camera
        bag_near = self.e["bag_side"] == near_side
        held_near = self.e["held_side"] == near_side
        held, bag = a["held"], a["bag"]

        # far arm and far-hand items behind the body
        stride = 0.12 + 0.3 * self.stride
        swing = 0.15 + 0.35 * abs(self.swing)
        far_arm = _arm_points((0.0, 0.195), -swing, -0.1, 1.0)
        near_arm = _arm_points((0.0, 0.195), swing, float(self.rng.uniform(0.05, 0.5)), 1.0)
        if held == "phone" and held_near:
            near_arm = [(0.0, 0.195), (0.03, 0.34), (0.11, 0.29)]
        far_shade = 0.78
        sleeve_frac = {"t-shirt": 0.38, "tank top": 0.0, "dress": 0.2 if self.e["logo"] % 2 else 0.0}.get(up, 1.0)
        sleeve_col = self.c2 if a["upper_pattern"] == "two-tone" else self.c1
        if a["hair_style"] == "long":
            pen.rect(-0.055, 0.06, 0.0, 0.3, self.hair)
        pen.limb(far_arm, [0.046, 0.04, 0.034], _mul(self.skin, far_shade))
        if sleeve_frac > 0:
            pen.limb(_along(far_arm, sleeve_frac), [0.06, 0.052, 0.046], _mul(sleeve_col, far_shade))
        fh = (far_arm[-1][0], far_arm[-1][1] + 0.012)
        if held == "umbrella" and not held_near:
            self._hand_item(pen, fh, "umbrella", 1.0)
        if bag == "backpack":
            pen.poly([(back - 0.075, 0.22), (back + 0.01, 0.2), (back + 0.01, 0.47), (back - 0.08, 0.46)], self.bag)
            pen.rect(back - 0.1, 0.34, back - 0.07, 0.44, _mul(self.bag, 0.8))

        # legs: far leg first
        hip = (0.0, 0.52)
        legs = []
        for s in (-1.0, 1.0):
            ang = s * stride
            knee = (hip[0] + 0.215 * math.sin(ang) + (0.03 if s < 0 else 0.0), hip[1] + 0.215 * math.cos(ang))
            ankle = (knee[0] + 0.22 * math.sin(ang * (1.5 if s < 0 else 0.8)), knee[1] + 0.22 * math.cos(ang))
            legs.append([hip, knee, ankle])
        self._lower_legs(pen, legs, [far_shade, 1.0], 1.0)
        self._pelvis(pen, 0.0, front=chest - 0.005 + belly, back=back + 0.005)
        low_reach = max(p[-1][0] for p in legs)
        low_back = min(p[-1][0] for p in legs)
        if up != "dress" and a["lower_type"] in ("skirt", "long skirt"):
            bottom = 0.67 if a["lower_type"] == "skirt" else 0.93
            f = 0.45 if bottom < 0.7 else 1.0
            self._skirt(pen, (back, chest + belly), bottom, (back - 0.03 + low_back * f * 0.6,
                                                            chest + 0.02 + low_reach * f * 0.6), self.lower)

        # torso
        mask_img = Image.new("L", pen.img.size, 0)
        pen.mask = ImageDraw.Draw(mask_img)
        g = self.c1
        top_back = back + 0.012
        if up == "tank top":
            pen.poly([(top_back, 0.17), (chest - 0.015, 0.17), (chest, 0.25), (chest + belly, 0.42), (chest, 0.5),
                      (back, 0.5), (back + 0.004, 0.3)], self.skin)
            pen.poly([(top_back + 0.01, 0.2), (chest - 0.012, 0.2), (chest, 0.26), (chest + belly + 0.004, 0.42),
                      (chest + 0.004, self.hem), (back - 0.004, self.hem), (back + 0.004, 0.3)], g, mask=True)
        else:
            hem_main = min(self.hem, 0.525)
            pen.poly([(top_back, 0.17), (chest - 0.02, 0.17), (chest + 0.004, 0.24), (chest + belly + 0.006, 0.42),
                      (chest + 0.006, hem_main), (back - 0.006, hem_main), (back - 0.002, 0.3)], g, mask=True)
            if up in ("coat", "dress"):
                w_f = chest + 0.02 + low_reach * 0.35
                w_b = back - 0.02 + low_back * 0.35
                self._skirt(pen, (back - 0.004, chest + belly + 0.004), self.hem, (w_b, w_f), g, mask=True)
        if sleeve_frac > 0:
            pen.limb(_along(near_arm, sleeve_frac), [0.064, 0.056, 0.05], sleeve_col,
                     mask=a["upper_pattern"] != "two-tone")
        pen.mask = None
        # near arm skin under/over sleeve: draw skin then redraw sleeve on top
        pen.limb(near_arm, [0.05, 0.042, 0.036], self.skin)
        if sleeve_frac > 0:
            pen.limb(_along(near_arm, sleeve_frac), [0.064, 0.056, 0.05], sleeve_col)
        self._pattern(pen, mask_img, "side")
        dark = _mul(g, 0.72)
        if up == "hoodie":
            pen.poly([(back - 0.01, 0.17), (back + 0.045, 0.16), (back + 0.03, 0.27), (back - 0.005, 0.28)], dark)
        elif up in ("jacket", "coat"):
            pen.line([(chest - 0.004, 0.2), (chest + belly, 0.42), (chest, self.hem - 0.01)], dark, 0.005)
        elif up == "sweater":
            pen.rect(back - 0.006, self.hem - 0.03, chest + 0.006, self.hem, dark)

        # straps / bags on the near side
        if bag == "backpack":
            pen.limb([(back + 0.02, 0.19), (chest - 0.02, 0.21), (chest - 0.02, 0.3), (back + 0.03, 0.42)],
                     [0.018, 0.018, 0.016, 0.016], _mul(self.bag, 0.85))
        if bag == "shoulder bag" and bag_near:
            pen.line([(-0.01, 0.175), (0.0, 0.48)], _mul(self.bag, 0.75), 0.012)
            pen.rect(-0.06, 0.47, 0.05, 0.58, self.bag)
            pen.rect(-0.06, 0.47, 0.05, 0.5, _mul(self.bag, 0.8))

        # head
        pen.rect(-0.018, 0.1, 0.026, 0.18, self.skin)
        self._head_side(pen)

        # near hand and its items
        nh = (near_arm[-1][0], near_arm[-1][1] + 0.012)
        if bag == "handbag" and bag_near:
            self._hand_item(pen, nh, "handbag", 1.0)
        if held != "none" and held_near:
            self._hand_item(pen, nh, held, 1.0)
        pen.ellipse(nh[0], nh[1], 0.019, 0.021, self.skin)

    def _head_side(self, pen: _Pen) -> None:
        a = self.a
        style, hc, skin = a["hair_style"], self.hair, self.skin
        hr = 0.047 if self.female else 0.05
        hu = 0.006
        pen.ellipse(hu, 0.068, hr, 0.064, skin)
        pen.poly([(hu + hr - 0.006, 0.07), (hu + hr + 0.012, 0.086), (hu + hr - 0.002, 0.094)], skin)
        if style != "bald":
            pen.chord(hu, 0.066, hr + 0.004, 0.066, 170, 330, hc)
            pen.poly([(hu - hr - 0.004, 0.07), (hu - 0.01, 0.04), (hu + 0.005, 0.125), (hu - hr + 0.01, 0.125)]
                     if style != "short" else [(hu - hr - 0.003, 0.07), (hu - 0.01, 0.04), (hu - 0.005, 0.1),
                                                (hu - hr + 0.01, 0.11)], hc)
            if style == "medium":
                pen.rect(hu - hr - 0.004, 0.07, hu - 0.005, 0.16, hc)
            elif style == "long":
                pen.rect(hu - hr - 0.006, 0.07, hu - 0.004, 0.3, hc)
            elif style == "ponytail":
                pen.limb([(hu - hr, 0.06), (hu - hr - 0.025, 0.12), (hu - hr - 0.02, 0.22)], [0.026, 0.022, 0.01],
                         _mul(hc, 0.92))
            elif style == "bun":
                pen.ellipse(hu - hr + 0.004, 0.035, 0.026, 0.024, _mul(hc, 0.92))
        pen.ellipse(hu - 0.004, 0.076, 0.009, 0.015, _mul(skin, 0.9))
        acc = a["face_accessory"]
        eye = (hu + hr - 0.016, 0.072)
        if acc != "sunglasses":
            pen.ellipse(eye[0], eye[1], 0.004, 0.004, (40, 30, 30))
        if acc == "glasses":
            pen.ellipse(eye[0] + 0.004, eye[1], 0.01, 0.01, None, outline=(25, 25, 25), width=0.004)
            pen.line([(eye[0] - 0.006, eye[1]), (hu - 0.004, 0.074)], (25, 25, 25), 0.003)
        elif acc == "sunglasses":
            pen.ellipse(eye[0] + 0.004, eye[1], 0.012, 0.011, (15, 15, 18))
            pen.line([(eye[0] - 0.006, eye[1]), (hu - 0.004, 0.074)], (15, 15, 18), 0.004)
        elif acc == "face mask":
            m = self.e["mask_rgb"]
            pen.poly([(hu + 0.01, 0.085), (hu + hr + 0.012, 0.088), (hu + hr + 0.006, 0.118), (hu + 0.012, 0.122)], m)
            pen.line([(hu + 0.01, 0.088), (hu - 0.004, 0.076)], _mul(m, 0.85), 0.003)
        self._hat(pen, hu, hr)


def render_person(attrs: dict[str, str], extras: dict[str, Any], view: str, facing: str, height_px: float,
                  rng: np.random.Generator, supersample: int = 2) -> Image.Image:
    """One person on a transparent RGBA layer; the body axis is the layer's centre column, the soles its bottom."""
    s = height_px * supersample
    w, h = int(0.7 * s) + 2, int(1.07 * s) + 2
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    pen = _Pen(layer, w / 2, 0.05 * s, s)
    pen.set_tilt(float(rng.uniform(-4.0, 4.0)))
    person = _Person(attrs, extras, view, facing, rng)
    person.draw(pen)
    if view == "side" and facing == "left":
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if supersample > 1:
        layer = layer.reduce(supersample)
    # soft shading: light from one side, darker toward the silhouette edges and the feet
    w, h = layer.size
    sc = s / supersample
    xs = (np.arange(w, dtype=np.float32) - w / 2 - float(rng.uniform(-0.05, 0.05)) * sc) / (0.16 * sc)
    prof = np.clip(1.06 - 0.22 * xs * xs, 0.74, 1.08)
    vert = 1.03 - 0.1 * np.arange(h, dtype=np.float32) / h
    arr = np.asarray(layer)
    rgb = arr[..., :3] * (vert[:, None] * prof[None, :])[..., None]
    out = np.empty_like(arr)
    out[..., :3] = np.minimum(rgb, 255.0)
    out[..., 3] = arr[..., 3]
    return Image.fromarray(out, "RGBA")


# ---- scenes -------------------------------------------------------------------------------------------------


def _rand_rgb(rng: np.random.Generator, lo: int = 30, hi: int = 230) -> RGB:
    v = rng.integers(lo, hi, 3)
    return (int(v[0]), int(v[1]), int(v[2]))


def _jit(rgb: Sequence[int], rng: np.random.Generator, amount: int = 18) -> RGB:
    v = np.clip(np.array(rgb[:3]) + rng.integers(-amount, amount + 1, 3), 0, 255)
    return (int(v[0]), int(v[1]), int(v[2]))


def _background(rng: np.random.Generator, cam: dict[str, Any], h: int, w: int) -> tuple[Image.Image, int]:
    img = Image.new("RGB", (w, h), _jit(cam["walls"][0], rng))
    d = ImageDraw.Draw(img)
    hy = int(h * (cam["horizon"] + rng.uniform(-0.07, 0.07)))
    x = -float(rng.uniform(0, 0.5)) * w
    while x < w:
        pw = float(rng.uniform(0.3, 1.3)) * w
        col = _jit(cam["walls"][int(rng.integers(len(cam["walls"])))], rng, 25)
        d.rectangle([x, 0, x + pw, hy], fill=col)
        kind = int(rng.integers(5))
        if kind == 0:  # windows
            ww, wh = float(rng.uniform(0.12, 0.3)) * w, float(rng.uniform(0.06, 0.14)) * h
            gx, gy = ww * float(rng.uniform(1.3, 2.0)), wh * float(rng.uniform(1.3, 1.8))
            wc = _jit((60, 75, 95), rng, 30)
            yy = float(rng.uniform(0.02, 0.1)) * h
            while yy + wh < hy - 4:
                xx = x + float(rng.uniform(0.05, 0.3)) * ww
                while xx + ww < x + pw:
                    d.rectangle([xx, yy, xx + ww, yy + wh], fill=wc, outline=_mul(col, 0.7))
                    xx += gx
                yy += gy
        elif kind == 1:  # shop front with goods behind glass
            top = hy - float(rng.uniform(0.15, 0.35)) * h
            d.rectangle([x + 2, top, x + pw - 2, hy], fill=_jit((110, 125, 135), rng, 30))
            for _ in range(int(rng.integers(3, 9))):
                bx, by = x + float(rng.uniform(0, pw)), top + float(rng.uniform(0, hy - top))
                d.rectangle([bx, by, bx + float(rng.uniform(3, 0.25 * w)), by + float(rng.uniform(3, 0.1 * h))],
                            fill=_rand_rgb(rng))
            d.rectangle([x, top - 0.05 * h, x + pw, top], fill=_rand_rgb(rng))
        elif kind == 2:  # siding
            step = float(rng.uniform(0.015, 0.04)) * h
            yy = 0.0
            while yy < hy:
                d.line([(x, yy), (x + pw, yy)], fill=_mul(col, 0.82), width=1)
                yy += step
        elif kind == 3:  # bricks
            bh = max(2.0, float(rng.uniform(0.015, 0.03)) * h)
            bwid = bh * 2.5
            yy, row = 0.0, 0
            while yy < hy:
                d.line([(x, yy), (x + pw, yy)], fill=_mul(col, 0.7), width=1)
                xx = x + (bwid / 2 if row % 2 else 0)
                while xx < x + pw:
                    d.line([(xx, yy), (xx, min(hy, yy + bh))], fill=_mul(col, 0.7), width=1)
                    xx += bwid
                yy += bh
                row += 1
        else:  # tree or sky patch
            if rng.random() < 0.5:
                d.rectangle([x, 0, x + pw, hy * float(rng.uniform(0.2, 0.6))], fill=_jit((170, 195, 220), rng, 25))
            tx = x + float(rng.uniform(0.2, 0.8)) * pw
            d.rectangle([tx - 0.03 * w, hy * 0.4, tx + 0.03 * w, hy], fill=_jit((80, 60, 45), rng))
            for _ in range(4):
                r = float(rng.uniform(0.12, 0.3)) * w
                cy = hy * float(rng.uniform(0.1, 0.45))
                cx = tx + float(rng.uniform(-0.15, 0.15)) * w
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jit((60, 110, 55), rng, 25))
        x += pw
    # ground
    gcol = _jit(_GROUNDS[cam["ground"]], rng, 14)
    d.rectangle([0, hy, w, h], fill=gcol)
    d.rectangle([0, hy, w, hy + max(2, int(0.012 * h))], fill=_mix(gcol, (230, 230, 225), 0.4))
    if cam["ground"] in ("tiles", "pavers", "indoor", "concrete"):
        n = int(rng.integers(4, 9))
        line = _mul(gcol, 0.78)
        for i in range(1, n + 1):
            yy = hy + (h - hy) * (i / n) ** 1.5
            d.line([(0, yy), (w, yy)], fill=line, width=1)
        vx = float(rng.uniform(-0.5, 1.5)) * w
        for i in range(-6, 7):
            d.line([(vx + i * 0.05 * w, hy), (vx + i * 0.45 * w, h)], fill=line, width=1)
    elif cam["ground"] == "asphalt" and rng.random() < 0.5:
        yy = hy + (h - hy) * float(rng.uniform(0.3, 0.8))
        d.rectangle([0, yy, w, yy + 0.01 * h], fill=(225, 220, 200))
    # clutter
    for _ in range(int(rng.integers(2, 8))):
        kind = int(rng.integers(5))
        cx = float(rng.uniform(-0.1, 1.1)) * w
        base = hy + float(rng.uniform(0, 0.12)) * h
        c = _rand_rgb(rng)
        if kind == 0:  # sign on a post
            d.rectangle([cx - 1, base - 0.3 * h, cx + 1, base], fill=(90, 90, 95))
            sw, sh = float(rng.uniform(0.1, 0.3)) * w, float(rng.uniform(0.04, 0.1)) * h
            d.rectangle([cx - sw / 2, base - 0.3 * h, cx + sw / 2, base - 0.3 * h + sh], fill=c)
        elif kind == 1:  # planter / box
            bw_, bh_ = float(rng.uniform(0.1, 0.4)) * w, float(rng.uniform(0.03, 0.1)) * h
            d.rectangle([cx, base - bh_, cx + bw_, base], fill=c, outline=_mul(c, 0.7))
        elif kind == 2:  # lamp post
            d.rectangle([cx - 1.5, 0, cx + 1.5, base], fill=(50, 55, 60))
        elif kind == 3:  # random blob
            r = float(rng.uniform(0.03, 0.15)) * w
            cy = float(rng.uniform(0.05, 0.95)) * h
            d.ellipse([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=c)
        else:  # bicycle-ish
            r = float(rng.uniform(0.06, 0.12)) * w
            for dx in (-r * 1.2, r * 1.2):
                d.ellipse([cx + dx - r, base - 2 * r, cx + dx + r, base], outline=(30, 30, 30), width=1)
            d.line([(cx - r * 1.2, base - r), (cx, base - 1.8 * r), (cx + r * 1.2, base - r)], fill=c, width=2)
    # people far away
    for _ in range(int(rng.integers(0, 3))):
        attrs, extras = sample_identity(rng)
        ph = float(rng.uniform(0.25, 0.55)) * h
        view = VIEWS[int(rng.integers(3))]
        layer = render_person(attrs, extras, view, "left" if rng.random() < 0.5 else "right", ph, rng, 1)
        fy = hy + float(rng.uniform(0.0, 0.15)) * h
        fx = float(rng.uniform(-0.1, 1.1)) * w
        img.paste(layer, (int(fx - layer.width / 2), int(fy - layer.height * 1.05 / 1.07)), layer)
    return img, hy


def _occlude(img: Image.Image, kind: str, rng: np.random.Generator, person_x: float, h: int, w: int) -> None:
    d = ImageDraw.Draw(img)
    if kind == "pole":
        pw = float(rng.uniform(0.05, 0.12)) * w
        px = person_x + float(rng.uniform(-0.3, 0.3)) * w
        c = _jit([(110, 112, 118), (40, 60, 45), (30, 30, 34), (170, 150, 60)][int(rng.integers(4))], rng)
        d.rectangle([px - pw / 2, -1, px + pw / 2, h], fill=c)
        d.rectangle([px - pw / 6, -1, px, h], fill=_mix(c, (255, 255, 255), 0.25))
    elif kind == "car":
        top = float(rng.uniform(0.64, 0.8)) * h
        c = _jit(_RGB[COLOURS[int(rng.integers(len(COLOURS)))]], rng)
        d.rounded_rectangle([-0.3 * w, top, 1.3 * w, h + 0.1 * h], radius=int(0.08 * h), fill=c)
        d.rectangle([-0.3 * w, top + 0.02 * h, 1.3 * w, top + 0.07 * h], fill=_mul(c, 0.6))
        d.line([(-0.3 * w, top + 0.12 * h), (1.3 * w, top + 0.11 * h)], fill=_mul(c, 0.75), width=2)
        wx = float(rng.uniform(0, 1)) * w
        d.ellipse([wx - 0.12 * h, h - 0.06 * h, wx + 0.12 * h, h + 0.18 * h], fill=(25, 25, 25))
    elif kind == "bin":
        bw_ = float(rng.uniform(0.25, 0.45)) * w
        bx = person_x + (1 if rng.random() < 0.5 else -1) * float(rng.uniform(0.1, 0.3)) * w
        top = float(rng.uniform(0.72, 0.84)) * h
        c = _jit([(50, 90, 60), (60, 60, 64), (40, 70, 140), (150, 110, 60)][int(rng.integers(4))], rng)
        d.rectangle([bx - bw_ / 2, top, bx + bw_ / 2, h], fill=c)
        d.rectangle([bx - bw_ / 2 - 2, top - 0.02 * h, bx + bw_ / 2 + 2, top + 0.01 * h], fill=_mul(c, 0.7))
    elif kind == "bush":
        top = float(rng.uniform(0.72, 0.84)) * h
        for _ in range(9):
            r = float(rng.uniform(0.2, 0.45)) * w
            cx = float(rng.uniform(-0.1, 1.1)) * w
            cy = top + float(rng.uniform(0.0, 0.12)) * h + r * 0.3
            d.ellipse([cx - r, cy - r * 0.6, cx + r, cy + r * 0.8], fill=_jit((55, 105, 50), rng, 25))
        d.rectangle([-1, top + 0.12 * h, w, h], fill=_jit((55, 100, 48), rng, 15))


def _camera(img: Image.Image, cam: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    """Camera look: resolution loss, blur, uneven light, white balance, saturation, tone curve, sensor noise."""
    h, w = img.height, img.width
    blur = (cam["blur"] + float(rng.uniform(0, 0.4))) * h / 384
    if cam["lowres"] < 0.8 or rng.random() < 0.2:
        f = min(1.0, cam["lowres"] * float(rng.uniform(0.85, 1.15)))
        small = img.resize((max(8, int(w * f)), max(8, int(h * f))), Image.Resampling.BILINEAR)
        img = small.resize((w, h), Image.Resampling.BILINEAR)
    if blur > 0.15:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    img = ImageEnhance.Color(img).enhance(float(cam["saturation"]))
    # uneven illumination: a smooth random field in [0.72, 1.0], compensated by the tone curve below
    field = Image.fromarray(rng.integers(184, 256, (4, 3)).astype(np.uint8), "L").resize(
        (w, h), Image.Resampling.BICUBIC)
    img = ImageChops.multiply(img, Image.merge("RGB", (field, field, field)))
    gains = np.array(cam["gains"], dtype=np.float64) * rng.uniform(0.95, 1.05, 3) * 1.16
    x = np.arange(256, dtype=np.float64) / 255.0
    bright = cam["brightness"] + float(rng.uniform(-0.04, 0.04))
    y = np.clip((x[None, :] * gains[:, None] - 0.5) * cam["contrast"] + 0.5 + bright, 0.0, 1.0) ** cam["gamma"]
    img = img.point(np.clip(y * 255.0 + 0.5, 0, 255).astype(np.int64).ravel().tolist())
    sigma = cam["noise"] * float(rng.uniform(0.7, 1.3)) * 255.0
    noise = rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(sigma)
    arr = np.asarray(img).astype(np.float32) + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def render_image(ident: dict[str, Any], plan: dict[str, Any], cam: dict[str, Any], seed: int,
                 size: tuple[int, int]) -> Image.Image:
    """Draw one image of one identity (pure function of its arguments)."""
    h, w = size
    rng = np.random.default_rng([seed, 11, ident["id"], plan["k"]])
    img, hy = _background(rng, cam, h, w)
    ph = h * float(rng.uniform(0.72, 0.97)) * min(1.0, ident["extras"]["height"])
    layer = render_person(ident["attributes"], ident["extras"], plan["view"], plan["facing"], ph, rng)
    px = w / 2 + float(rng.uniform(-0.12, 0.12)) * w
    foot = h * float(rng.uniform(0.96, 1.02))
    img.paste(layer, (int(round(px - layer.width / 2)), int(round(foot - layer.height * 1.05 / 1.07))), layer)
    occ = plan["occluder"]
    if occ == "person":
        attrs, extras = sample_identity(rng)
        layer2 = render_person(attrs, extras, VIEWS[int(rng.integers(3))], "left" if rng.random() < 0.5 else "right",
                               h * float(rng.uniform(0.8, 1.0)), rng)
        side = 1 if rng.random() < 0.5 else -1
        ox = w / 2 + side * w * float(rng.uniform(0.5, 0.75))
        img.paste(layer2, (int(ox - layer2.width / 2), int(h * 1.03 - layer2.height * 1.05 / 1.07)), layer2)
    elif occ != "none":
        _occlude(img, occ, rng, px, h, w)
    return _camera(img, cam, rng)


def _render_job(job: tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], int, tuple[int, int]]) -> int:
    path, ident, plan, cam, seed, size = job
    img = render_image(ident, plan, cam, seed, size)
    img.save(path, format="JPEG", quality=90)
    return 1
