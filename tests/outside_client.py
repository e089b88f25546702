import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

FOLDER = sys.argv[1]  # the folder `tbps-compress export` wrote
prep = json.load(open(f"{FOLDER}/preprocess.json"))["image"]
tokenizer = Tokenizer.from_file(f"{FOLDER}/tokenizer.json")  # cleans captions, adds SOT/EOT, pads
image_model = ort.InferenceSession(f"{FOLDER}/image_encoder.onnx")
text_model = ort.InferenceSession(f"{FOLDER}/text_encoder.onnx")


def embed_images(paths):  # -> (N, D) float32, L2-normalised
    h, w = prep["image_size_hw"]
    rgb = [Image.open(p).convert("RGB").resize((w, h), Image.Resampling.BICUBIC) for p in paths]
    x = (np.stack([np.asarray(i, np.float32) / 255 for i in rgb]) - np.float32(prep["mean"])) / np.float32(prep["std"])
    return image_model.run(["embedding"], {"image": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]


def embed_texts(captions):  # -> (N, D) float32, L2-normalised; similarity = embed_texts(q) @ embed_images(g).T
    ids = np.array([e.ids for e in tokenizer.encode_batch(captions)], dtype=np.int64)
    return text_model.run(["embedding"], {"text": ids})[0]
