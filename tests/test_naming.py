from ctprep.naming import LABEL_NAMES, case_id, parse_volume_name, patient_id, strip_volume_suffix


def test_label_names_are_the_18_ctrate_columns_in_order():
    assert len(LABEL_NAMES) == 18
    assert LABEL_NAMES[0] == "Medical material"
    assert LABEL_NAMES[9] == "Lung nodule"
    assert LABEL_NAMES[-1] == "Interlobular septal thickening"


def test_parse_ctrate_name():
    v = parse_volume_name("train_123_a_1.nii.gz")
    assert (v.split, v.patient, v.scan, v.reconstruction) == ("train", "123", "a", "1")
    assert v.patient_id == "train_123" and v.scan_id == "train_123_a"
    assert parse_volume_name("valid_7_b_2").patient_id == "valid_7"


def test_patient_id_groups_scans_and_reconstructions():
    assert patient_id("train_5_a_1.nii.gz") == patient_id("train_5_b_2.nii.gz") == "train_5"
    assert patient_id("train_5_a_1.nii.gz") != patient_id("train_55_a_1.nii.gz")
    assert patient_id("valid_5_a_1.nii.gz") != patient_id("train_5_a_1.nii.gz")


def test_non_ctrate_names_are_their_own_patient():
    assert parse_volume_name("chest_ct_dicom") is None
    assert patient_id("chest_contrast_crop.nii.gz") == "chest_contrast_crop"
    assert patient_id("scan.mha") == "scan"


def test_case_id_matches_the_evaluator():
    assert case_id("valid_1_a_1.nii.gz") == "valid_1_a_1"
    assert case_id("valid_1_a_1.mha") == "valid_1_a_1"
    assert case_id("valid_1_a_1") == "valid_1_a_1"
    assert strip_volume_suffix("x.NII.GZ") == "x"
