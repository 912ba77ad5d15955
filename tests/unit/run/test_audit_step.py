"""The privacy section of a study's summary and report, from audit rows (no Ray run)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.config import load_config
from engine.records.report import write_report
from engine.records.results import Results
from engine.run.audit import privacy_summary

REPO = Path(__file__).resolve().parents[3]


def test_the_privacy_table_states_the_setting_and_each_artefact(tmp_path: Path) -> None:
    cfg = load_config(REPO / "experiments" / "privacy.yaml", [
        "data.domains=[breast, retina]", "privacy.transfer=predictions",
        "evaluation.baselines=[]", "privacy.dp.enabled=true", "privacy.dp.epsilon=2"])
    results = Results()
    for replicate, (leak, glob) in enumerate([(0.70, 0.52), (0.80, 0.54)]):
        for method, auc in (("audit:teacher", leak), ("audit:universal", glob)):
            results.add(method, 0, "breast", "breast",
                        {"mia_auc": auc, "mia_tpr_at_1fpr": 0.1, "mia_advantage": 0.3,
                         "mia_n": 64, "utility_auc": 0.8}, replicate=replicate)
    results.add("universal", 0, "breast", "breast", {"auc": 0.8})  # not an audit row
    privacy = privacy_summary(cfg, results)
    assert privacy["transfer"] == "predictions" and privacy["dp"]["epsilon"] == 2.0
    assert set(privacy["domains"]) == {"breast"}  # retina was never audited
    cell = privacy["domains"]["breast"]["teacher"]["mia_auc"]
    assert cell["n"] == 2 and abs(cell["mean"] - 0.75) < 1e-9
    teacher, glob = privacy["artefacts"]
    assert teacher["status"] == ("stayed home (predictions; attacked there as a reference, "
                                 "DP-SGD target epsilon 2)")
    assert "post-processing of DP outputs" in glob["status"]
    summary = {"name": "privacy", "strategy": "universal", "rounds": 2, "seed": 0,
               "domains": {"breast": {}, "retina": {}}, "privacy": privacy}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    report = Path(write_report(str(tmp_path))).read_text()
    for text in ("## Privacy: membership-inference audit",
                 "`privacy.transfer: predictions`, DP-SGD: on, epsilon=2.0",
                 "| teacher | stayed home (predictions; attacked there as a reference, "
                 "DP-SGD target epsilon 2) | 0.750 | 0.100 | 0.300 | 0.800 |",
                 "| artefact | status | attack AUC | TPR at 1% FPR | advantage | "
                 "test AUC (utility) |", "### breast"):
        assert text in report, text
    assert "### retina" not in report
