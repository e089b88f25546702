"""tbps_compress.retrieval"""

from .metrics import metrics as metrics
