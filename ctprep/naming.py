"""CT-RATE names: labels, volume-name parsing, patient ids and evaluator case ids.

`train_123_a_1.nii.gz` is split `train`, patient `123`, scan `a`, reconstruction `1`.
Reconstructions of one scan share a report (and so labels); scans of one patient must stay in
one fold, so the patient id for splitting is the first two parts (`train_123`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# The 18 CT-RATE multi-abnormality labels, in the column order of the labels CSV.
LABEL_NAMES: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

# File suffixes we can read, longest first so `.nii.gz` wins over `.gz`.
VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")

_CTRATE = re.compile(r"^(?P<split>[A-Za-z]+)_(?P<patient>\d+)_(?P<scan>[A-Za-z0-9]+)_(?P<recon>\d+)$")


def strip_volume_suffix(name: str) -> str:
    """`train_1_a_1.nii.gz` -> `train_1_a_1`; names without a known suffix are returned as is."""
    lower = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_id(input_image_name: str) -> str:
    """The VLM3D evaluator's case id: `Path(name).stem` with `.nii` removed.

    `valid_1_a_1.nii.gz` and `valid_1_a_1.mha` both become `valid_1_a_1`.
    """
    stem = Path(input_image_name).stem
    return stem[:-4] if stem.endswith(".nii") else stem


@dataclass(frozen=True)
class VolumeName:
    split: str
    patient: str
    scan: str
    reconstruction: str

    @property
    def patient_id(self) -> str:
        return f"{self.split}_{self.patient}"

    @property
    def scan_id(self) -> str:
        return f"{self.split}_{self.patient}_{self.scan}"


def parse_volume_name(name: str) -> VolumeName | None:
    """Parse a CT-RATE volume name (with or without suffix); None when it is not one."""
    match = _CTRATE.match(strip_volume_suffix(Path(name).name))
    if match is None:
        return None
    return VolumeName(match["split"], match["patient"], match["scan"], match["recon"])


def patient_id(name: str) -> str:
    """Patient id used to keep a patient's scans in one fold.

    CT-RATE names give `split_patient` (`train_123_a_1.nii.gz` -> `train_123`). Any other name is
    its own patient (the name without its suffix): without a naming rule we cannot know that two
    files come from one person, so such datasets should use CT-RATE-style names or `--from` folds.
    """
    parsed = parse_volume_name(name)
    return parsed.patient_id if parsed is not None else strip_volume_suffix(Path(name).name)
