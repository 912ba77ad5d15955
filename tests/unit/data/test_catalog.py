from __future__ import annotations

import pytest

from engine.data import MISSION_DOMAINS, domain_catalog


def test_the_eight_mission_domains() -> None:
    catalog = domain_catalog()
    assert tuple(catalog) == MISSION_DOMAINS
    expected = {"breast": ("binary", 2), "pneumonia": ("binary", 2), "retina": ("ordinal", 5),
                "pathology": ("multi-class", 9), "adrenal": ("binary", 2),
                "vessel": ("binary", 2), "ct-region": ("multi-class", 3),
                "mr-xr": ("multi-class", 3)}
    assert {n: (s.task, s.num_classes) for n, s in catalog.items()} == expected
    assert catalog["ct-region"].label_names == ("AbdomenCT", "ChestCT", "HeadCT")
    assert catalog["pathology"].dataset == "pathmnist_subset"


def test_extra_domains_extend_the_catalog() -> None:
    catalog = domain_catalog({"chest": {"source": "medmnist", "dataset": "chestmnist",
                                        "size": 64, "modality": "X-ray"}})
    assert catalog["chest"].task == "multi-label" and catalog["chest"].num_labels == 14
    assert catalog["chest"].size == 64


@pytest.mark.parametrize(("entry", "message"), [
    ({"source": "medmnist", "dataset": "breastmnist", "colour": "red"}, "unknown key"),
    ({"source": "kaggle"}, "source must be"),
    ({"source": "mednist", "classes": ["CXR", "Foot"]}, "needs 'classes'"),
    ({"source": "mednist", "classes": ["CXR", "AbdomenCT"]}, "claimed by domains"),
])
def test_bad_domain_entries(entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        domain_catalog({"extra": entry})
