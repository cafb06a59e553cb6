"""The data layer: one dataset representation, readers of the published formats, validation,
statistics, PyTorch datasets (``cmpagl.data.torch_data``) and the synthetic default dataset
(``cmpagl.data.synthetic``).

Only the light, torch-free pieces are re-exported here.
"""

from cmpagl.data.dataset import CaptionDataset, DataError, split_off_val
from cmpagl.data.readers import detect_format, load_dataset, read_karpathy, read_precomp

__all__ = [
    "CaptionDataset",
    "DataError",
    "detect_format",
    "load_dataset",
    "read_karpathy",
    "read_precomp",
    "split_off_val",
]
