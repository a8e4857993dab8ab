"""cliprec.report: values with CIs, paired differences; `dvc exp show --json` stubbed by a captured answer."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import ranks_doc, with_queries

from cliprec import paths, report
from cliprec.cli import main
from cliprec.evaluate import headline

# `dvc exp show --json` (DVC 3.67) captured in a scratch git+dvc repo after `dvc repro`, a commit and
# `dvc exp run -n amp-on -S amp=true`, `-n amp-lr -S amp=true -S lr=3.0e-05`, `-n lr-up -S amp=false
# -S lr=2.5e-05` (in that order); metric files trimmed to the keys the report reads.
EXP_SHOW_JSON = (
    '[{"rev":"workspace","name":null,"data":{"rev":"workspace","timestamp":null,"params":{"params.yaml":{'
    '"data":{"setup":"demo","categories":["Amazon_Fashion","Appliances"],"lr":2.5e-05,"amp":false}}},"met'
    'rics":{"metrics/Amazon_Fashion/zeroshot.json":{"data":{"text_to_image":{"recall_at_1":0.1,"recall_at'
    '_5":0.3,"recall_at_10":0.4,"mrr":0.2,"ndcg_at_10":0.25,"gallery_size":250},"multimodal":{"recall_at_'
    '5":0.4,"skipped_no_alt":90},"image_to_image":{"recall_at_5":0.35,"skipped_no_alt":90},"avg_mean_simi'
    'larity_at_5":0.91}},"metrics/Amazon_Fashion/lora.json":{"data":{"text_to_image":{"recall_at_1":0.305'
    ',"recall_at_5":0.505,"recall_at_10":0.605,"mrr":0.405,"ndcg_at_10":0.455,"gallery_size":250},"multim'
    'odal":{"recall_at_5":0.605,"skipped_no_alt":90},"image_to_image":{"recall_at_5":0.555,"skipped_no_al'
    't":90},"avg_mean_similarity_at_5":0.81}},"metrics/Appliances/zeroshot.json":{"data":{"text_to_image"'
    ':{"recall_at_1":0.15,"recall_at_5":0.35,"recall_at_10":0.45,"mrr":0.25,"ndcg_at_10":0.3,"gallery_siz'
    'e":250},"multimodal":{"recall_at_5":0.45,"skipped_no_alt":90},"image_to_image":{"recall_at_5":0.4,"s'
    'kipped_no_alt":90},"avg_mean_similarity_at_5":0.91}},"metrics/Appliances/lora.json":{"data":{"text_t'
    'o_image":{"recall_at_1":0.355,"recall_at_5":0.555,"recall_at_10":0.655,"mrr":0.455,"ndcg_at_10":0.50'
    '5,"gallery_size":250},"multimodal":{"recall_at_5":0.655,"skipped_no_alt":90},"image_to_image":{"reca'
    'll_at_5":0.605,"skipped_no_alt":90},"avg_mean_similarity_at_5":0.81}}},"deps":{"gen.py":{"hash":"a1e'
    '241b441b38af291e859b089dcf10e","size":948,"nfiles":null}},"outs":{},"meta":{}},"error":null,"experim'
    'ents":null},{"rev":"27abee77bc446f229a96d5be11ea35611b58c0e0","name":"master","data":{"rev":"27abee7'
    '7bc446f229a96d5be11ea35611b58c0e0","timestamp":"2026-11-27T14:58:32","params":{"params.yaml":{"data"'
    ':{"setup":"demo","categories":["Amazon_Fashion","Appliances"],"lr":2e-05,"amp":false}}},"metrics":{"'
    'metrics/Amazon_Fashion/zeroshot.json":{"data":{"text_to_image":{"recall_at_1":0.1,"recall_at_5":0.3,'
    '"recall_at_10":0.4,"mrr":0.2,"ndcg_at_10":0.25,"gallery_size":250},"multimodal":{"recall_at_5":0.4,"'
    'skipped_no_alt":90},"image_to_image":{"recall_at_5":0.35,"skipped_no_alt":90},"avg_mean_similarity_a'
    't_5":0.91}},"metrics/Amazon_Fashion/lora.json":{"data":{"text_to_image":{"recall_at_1":0.3,"recall_a'
    't_5":0.5,"recall_at_10":0.6,"mrr":0.4,"ndcg_at_10":0.45,"gallery_size":250},"multimodal":{"recall_at'
    '_5":0.6,"skipped_no_alt":90},"image_to_image":{"recall_at_5":0.55,"skipped_no_alt":90},"avg_mean_sim'
    'ilarity_at_5":0.81}},"metrics/Appliances/zeroshot.json":{"data":{"text_to_image":{"recall_at_1":0.15'
    ',"recall_at_5":0.35,"recall_at_10":0.45,"mrr":0.25,"ndcg_at_10":0.3,"gallery_size":250},"multimodal"'
    ':{"recall_at_5":0.45,"skipped_no_alt":90},"image_to_image":{"recall_at_5":0.4,"skipped_no_alt":90},"'
    'avg_mean_similarity_at_5":0.91}},"metrics/Appliances/lora.json":{"data":{"text_to_image":{"recall_at'
    '_1":0.35,"recall_at_5":0.55,"recall_at_10":0.65,"mrr":0.45,"ndcg_at_10":0.5,"gallery_size":250},"mul'
    'timodal":{"recall_at_5":0.65,"skipped_no_alt":90},"image_to_image":{"recall_at_5":0.6,"skipped_no_al'
    't":90},"avg_mean_similarity_at_5":0.81}}},"deps":{"gen.py":{"hash":"a1e241b441b38af291e859b089dcf10e'
    '","size":948,"nfiles":null}},"outs":{},"meta":{}},"error":null,"experiments":[{"revs":[{"rev":"84fc0'
    '45ebec6ebeb9e6cb1eae1f91202e57a3bcd","name":"lr-up","data":{"rev":"84fc045ebec6ebeb9e6cb1eae1f91202e'
    '57a3bcd","timestamp":"2026-11-27T14:58:50","params":{"params.yaml":{"data":{"setup":"demo","categori'
    'es":["Amazon_Fashion","Appliances"],"lr":2.5e-05,"amp":false}}},"metrics":{"metrics/Amazon_Fashion/z'
    'eroshot.json":{"data":{"text_to_image":{"recall_at_1":0.1,"recall_at_5":0.3,"recall_at_10":0.4,"mrr"'
    ':0.2,"ndcg_at_10":0.25,"gallery_size":250},"multimodal":{"recall_at_5":0.4,"skipped_no_alt":90},"ima'
    'ge_to_image":{"recall_at_5":0.35,"skipped_no_alt":90},"avg_mean_similarity_at_5":0.91}},"metrics/Ama'
    'zon_Fashion/lora.json":{"data":{"text_to_image":{"recall_at_1":0.305,"recall_at_5":0.505,"recall_at_'
    '10":0.605,"mrr":0.405,"ndcg_at_10":0.455,"gallery_size":250},"multimodal":{"recall_at_5":0.605,"skip'
    'ped_no_alt":90},"image_to_image":{"recall_at_5":0.555,"skipped_no_alt":90},"avg_mean_similarity_at_5'
    '":0.81}},"metrics/Appliances/zeroshot.json":{"data":{"text_to_image":{"recall_at_1":0.15,"recall_at_'
    '5":0.35,"recall_at_10":0.45,"mrr":0.25,"ndcg_at_10":0.3,"gallery_size":250},"multimodal":{"recall_at'
    '_5":0.45,"skipped_no_alt":90},"image_to_image":{"recall_at_5":0.4,"skipped_no_alt":90},"avg_mean_sim'
    'ilarity_at_5":0.91}},"metrics/Appliances/lora.json":{"data":{"text_to_image":{"recall_at_1":0.355,"r'
    'ecall_at_5":0.555,"recall_at_10":0.655,"mrr":0.455,"ndcg_at_10":0.505,"gallery_size":250},"multimoda'
    'l":{"recall_at_5":0.655,"skipped_no_alt":90},"image_to_image":{"recall_at_5":0.605,"skipped_no_alt":'
    '90},"avg_mean_similarity_at_5":0.81}}},"deps":{"gen.py":{"hash":"a1e241b441b38af291e859b089dcf10e","'
    'size":948,"nfiles":null}},"outs":{},"meta":{}},"error":null,"experiments":null}],"executor":null,"na'
    'me":"lr-up"},{"revs":[{"rev":"f4d9d7bc7e3d5565a9f5afc246897d672964587d","name":"amp-lr","data":{"rev'
    '":"f4d9d7bc7e3d5565a9f5afc246897d672964587d","timestamp":"2026-11-27T14:58:42","params":{"params.yam'
    'l":{"data":{"setup":"demo","categories":["Amazon_Fashion","Appliances"],"lr":3e-05,"amp":true}}},"me'
    'trics":{"metrics/Amazon_Fashion/zeroshot.json":{"data":{"text_to_image":{"recall_at_1":0.1,"recall_a'
    't_5":0.3,"recall_at_10":0.4,"mrr":0.2,"ndcg_at_10":0.25,"gallery_size":250},"multimodal":{"recall_at'
    '_5":0.4,"skipped_no_alt":90},"image_to_image":{"recall_at_5":0.35,"skipped_no_alt":90},"avg_mean_sim'
    'ilarity_at_5":0.91}},"metrics/Amazon_Fashion/lora.json":{"data":{"text_to_image":{"recall_at_1":0.32'
    ',"recall_at_5":0.52,"recall_at_10":0.62,"mrr":0.42,"ndcg_at_10":0.47,"gallery_size":250},"multimodal'
    '":{"recall_at_5":0.62,"skipped_no_alt":90},"image_to_image":{"recall_at_5":0.57,"skipped_no_alt":90}'
    ',"avg_mean_similarity_at_5":0.81}},"metrics/Appliances/zeroshot.json":{"data":{"text_to_image":{"rec'
    'all_at_1":0.15,"recall_at_5":0.35,"recall_at_10":0.45,"mrr":0.25,"ndcg_at_10":0.3,"gallery_size":250'
    '},"multimodal":{"recall_at_5":0.45,"skipped_no_alt":90},"image_to_image":{"recall_at_5":0.4,"skipped'
    '_no_alt":90},"avg_mean_similarity_at_5":0.91}},"metrics/Appliances/lora.json":{"data":{"text_to_imag'
    'e":{"recall_at_1":0.37,"recall_at_5":0.57,"recall_at_10":0.67,"mrr":0.47,"ndcg_at_10":0.52,"gallery_'
    'size":250},"multimodal":{"recall_at_5":0.67,"skipped_no_alt":90},"image_to_image":{"recall_at_5":0.6'
    '2,"skipped_no_alt":90},"avg_mean_similarity_at_5":0.81}}},"deps":{"gen.py":{"hash":"a1e241b441b38af2'
    '91e859b089dcf10e","size":948,"nfiles":null}},"outs":{},"meta":{}},"error":null,"experiments":null}],'
    '"executor":null,"name":"amp-lr"},{"revs":[{"rev":"19f57df9ad4d54660363e9a7a2273933a82490b5","name":"'
    'amp-on","data":{"rev":"19f57df9ad4d54660363e9a7a2273933a82490b5","timestamp":"2026-11-27T14:58:36","'
    'params":{"params.yaml":{"data":{"setup":"demo","categories":["Amazon_Fashion","Appliances"],"lr":2e-'
    '05,"amp":true}}},"metrics":{"metrics/Amazon_Fashion/zeroshot.json":{"data":{"text_to_image":{"recall'
    '_at_1":0.1,"recall_at_5":0.3,"recall_at_10":0.4,"mrr":0.2,"ndcg_at_10":0.25,"gallery_size":250},"mul'
    'timodal":{"recall_at_5":0.4,"skipped_no_alt":90},"image_to_image":{"recall_at_5":0.35,"skipped_no_al'
    't":90},"avg_mean_similarity_at_5":0.91}},"metrics/Amazon_Fashion/lora.json":{"data":{"text_to_image"'
    ':{"recall_at_1":0.31,"recall_at_5":0.51,"recall_at_10":0.61,"mrr":0.41,"ndcg_at_10":0.46,"gallery_si'
    'ze":250},"multimodal":{"recall_at_5":0.61,"skipped_no_alt":90},"image_to_image":{"recall_at_5":0.56,'
    '"skipped_no_alt":90},"avg_mean_similarity_at_5":0.81}},"metrics/Appliances/zeroshot.json":{"data":{"'
    'text_to_image":{"recall_at_1":0.15,"recall_at_5":0.35,"recall_at_10":0.45,"mrr":0.25,"ndcg_at_10":0.'
    '3,"gallery_size":250},"multimodal":{"recall_at_5":0.45,"skipped_no_alt":90},"image_to_image":{"recal'
    'l_at_5":0.4,"skipped_no_alt":90},"avg_mean_similarity_at_5":0.91}},"metrics/Appliances/lora.json":{"'
    'data":{"text_to_image":{"recall_at_1":0.36,"recall_at_5":0.56,"recall_at_10":0.66,"mrr":0.46,"ndcg_a'
    't_10":0.51,"gallery_size":250},"multimodal":{"recall_at_5":0.66,"skipped_no_alt":90},"image_to_image'
    '":{"recall_at_5":0.61,"skipped_no_alt":90},"avg_mean_similarity_at_5":0.81}}},"deps":{"gen.py":{"has'
    'h":"a1e241b441b38af291e859b089dcf10e","size":948,"nfiles":null}},"outs":{},"meta":{}},"error":null,"'
    'experiments":null}],"executor":null,"name":"amp-on"}]}]'
)


REPO = Path(__file__).resolve().parents[1]
AMP_REV = "f4d9d7bc7e3d5565a9f5afc246897d672964587d"  # experiment `amp-lr` in EXP_SHOW_JSON
N = 100


def metrics_file(r1: float, sim: float = 0.9) -> dict:
    """A workspace detail file as the evaluate stage writes it, CIs included."""
    values = {"recall_at_1": r1, "recall_at_5": r1 + 0.2, "recall_at_10": r1 + 0.3, "mrr": r1 + 0.1,
              "ndcg_at_10": r1 + 0.15}  # fmt: skip
    ci = {k: {"low": round(v - 0.05, 6), "high": round(v + 0.05, 6)} for k, v in values.items()}
    mode = {**values, "gallery_size": N, "queries": N, "ci95": ci}
    return {
        "text_to_image": mode,
        "image_to_text": mode,
        "multimodal": {**mode, "skipped_no_alt": 0},
        "image_to_image": {**mode, "skipped_no_alt": 0},
        "avg_mean_similarity_at_5": sim,
        "avg_mean_similarity_at_5_ci95": {"low": sim - 0.01, "high": sim + 0.01},
        "ann_recall_at_10": 1.0,
    }


def ranks(top5: int) -> dict:
    """N queries, `top5` of them ranked 2 (in the top 5), the rest 50."""
    t2i = [2 if i < top5 else 50 for i in range(N)]
    doc = ranks_doc(t2i, alt=list(t2i))
    doc["ranks"]["image_to_text"] = doc["ranks"]["multimodal"] = list(t2i)
    return doc


@pytest.fixture
def project(tmp_path):
    """params.yaml + metrics and ranks of both categories; LoRA finds 30 more queries than zero-shot."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    for cat, base in (("Amazon_Fashion", 0.1), ("Appliances", 0.15)):
        (tmp_path / "metrics" / cat).mkdir(parents=True)
        for variant, extra, top5 in (("zeroshot", 0.0, 20), ("lora", 0.2, 50)):
            write_metrics(tmp_path, cat, variant, metrics_file(base + extra, 0.91 - extra / 2))
            (tmp_path / "metrics" / cat / f"{variant}.ranks.json").write_text(json.dumps(ranks(top5)))
    return tmp_path


def write_metrics(root: Path, cat: str, variant: str, detail: dict) -> None:
    """What the evaluate stage writes: the detail file and its headline, the DVC metrics file."""
    (root / paths.metrics_detail_path(cat, variant)).write_text(json.dumps(detail))
    (root / paths.metrics_path(cat, variant)).write_text(json.dumps(headline(detail, cat, variant)))


def commit_amp_ranks(project: Path, top5: int = 52) -> str:
    """Commit ranks and metrics as an AMP experiment would have them; returns the commit (for AMP_REV)."""
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    for cat, base in (("Amazon_Fashion", 0.1), ("Appliances", 0.15)):
        (project / "metrics" / cat / "lora.ranks.json").write_text(json.dumps(ranks(top5)))
        write_metrics(project, cat, "lora", metrics_file(base + 0.22, 0.8))
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "amp"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    for cat, base in (("Amazon_Fashion", 0.1), ("Appliances", 0.15)):  # the workspace's own LoRA again
        (project / "metrics" / cat / "lora.ranks.json").write_text(json.dumps(ranks(50)))
        write_metrics(project, cat, "lora", metrics_file(base + 0.2, 0.81))
    return head.stdout.strip()


def stub_dvc(monkeypatch, stdout=EXP_SHOW_JSON, returncode=0, stderr=""):
    """Replace only the `dvc` calls: `dvc exp show --json` answers with `stdout`; git runs for real."""
    calls = []
    real = subprocess.run

    def fake_run(cmd, **kwargs):
        if cmd[0] == "git":
            return real(cmd, **kwargs)
        calls.append((cmd, kwargs.get("cwd")))
        return subprocess.CompletedProcess(cmd, returncode, stdout=stdout, stderr=stderr)

    monkeypatch.setattr(report.subprocess, "run", fake_run)
    return calls


def table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in text.split("Paired differences")[0].splitlines():
        if line.startswith("| ") and not line.startswith("| Category"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def diff_rows(text: str) -> dict[tuple[str, str, str], list[str]]:
    rows = {}
    for line in text.split("Paired differences")[1].splitlines():
        if line.startswith("| ") and not line.startswith("| Category"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[(cells[0], cells[1], cells[2])] = cells[3:]
    return rows


def test_parse_captured_exp_show():
    exps = report.parse_experiments(json.loads(EXP_SHOW_JSON))
    assert sorted(e.name for e in exps) == ["amp-lr", "amp-on", "lr-up"]
    newest = report.newest_amp_experiment(exps)
    assert newest.name == "amp-lr" and newest.params["amp"] is True and newest.params["lr"] == 3e-05
    assert newest.metrics["metrics/Appliances/lora.json"]["text_to_image"]["recall_at_1"] == 0.37
    assert report.find_experiment(exps, "amp-on").params["lr"] == 2e-05
    assert report.find_experiment(exps, newest.rev[:7]) is newest
    with pytest.raises(report.ReportError, match="no finished experiment named 'nope'"):
        report.find_experiment(exps, "nope")


def test_report_json_has_values_cis_and_paired_differences(project, monkeypatch):
    amp_rev = commit_amp_ranks(project)
    stub_dvc(monkeypatch, stdout=EXP_SHOW_JSON.replace(AMP_REV, amp_rev))
    data = json.loads(report.build_report_json(project))
    r5 = data["Appliances"]["text_to_image"]["recall_at_5"]
    assert r5["zeroshot"] == {"value": 0.35, "ci_low": 0.3, "ci_high": 0.4}
    assert r5["lora"]["value"] == 0.55
    # the experiment's detail file, read from its commit: DVC shows only the headline, without CIs
    assert r5["lora_amp"] == pytest.approx({"value": 0.57, "ci_low": 0.52, "ci_high": 0.62})
    d = r5["lora_minus_zeroshot"]
    assert d["value"] == pytest.approx(0.3) and d["ci_low"] > 0 and d["p_value"] < 0.001 and d["significant"]
    amp = r5["lora_amp_minus_lora"]  # 2 more queries in the top 5: not significant
    assert amp["value"] == pytest.approx(0.02) and amp["p_value"] > 0.05 and not amp["significant"]
    assert set(data) == {"Amazon_Fashion", "Appliances"}
    assert set(data["Appliances"]) == set(report.MODES) - {"queries"}  # this project has no shopper queries


def test_report_markdown(project, monkeypatch):
    calls = stub_dvc(monkeypatch, stdout="[]")
    text = report.build_report(project)
    assert calls == [(["dvc", "exp", "show", "--json"], project)]
    rows = table_rows(text)
    assert rows[("Appliances", "LoRA")][:2] == ["0.350 [0.300, 0.400]", "0.550 [0.500, 0.600]"]
    assert rows[("Appliances", "LoRA+AMP")][0] == "—, run `dvc exp run -S amp=true`"
    diffs = diff_rows(text)
    r5 = diffs[("Appliances", "LoRA − zero-shot", "T→I")][1]
    assert r5.startswith("+0.300 [") and r5.endswith("▲")
    assert diffs[("Appliances", "LoRA − zero-shot", "T→I")][0].startswith("+0.000")  # R@1: nobody ranks 1


def test_unpaired_experiment_is_said_not_compared(project, monkeypatch):
    amp_rev = commit_amp_ranks(project)
    (project / "metrics" / "Appliances" / "lora.ranks.json").write_text(json.dumps(ranks_doc([2] * 50)))
    stub_dvc(monkeypatch, stdout=EXP_SHOW_JSON.replace(AMP_REV, amp_rev))
    text = report.build_report(project)
    assert "not the same test set: gallery of 100 products, was 50" in text


def test_dvc_failure_degrades_to_no_experiments(project, monkeypatch, caplog):
    stub_dvc(monkeypatch, stdout="", returncode=253, stderr="ERROR: you are not inside of a DVC repository")
    rows = table_rows(report.build_report(project))
    assert rows[("Appliances", "LoRA+AMP")][0].startswith("—, run `dvc exp run")
    assert "not inside of a DVC repository" in caplog.text


def test_from_exp_of_an_earlier_commit(project, monkeypatch):
    # none on the checked-out commit; `dvc exp list -A` places amp-on on an earlier one
    def fake_run(cmd, **kwargs):
        if cmd[0] == "git":
            return subprocess.CompletedProcess(cmd, 128, stdout="", stderr="not a git repository")
        if cmd[:3] == ["dvc", "exp", "list"]:
            out = "0f1e2d3:\n\t9a8b7c6 [amp-on]\n\t5a5a5a5 [lr-up]\n"
        else:
            out = EXP_SHOW_JSON if cmd[-2:] == ["--rev", "0f1e2d3"] else "[]"
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(report.subprocess, "run", fake_run)
    assert table_rows(report.build_report(project))[("Appliances", "LoRA+AMP")][0].startswith("—, run")
    text = report.build_report(project, from_exp="amp-on")
    assert table_rows(text)[("Amazon_Fashion", "LoRA+AMP (exp `amp-on`)")][0] == "0.310"  # a file without CIs
    assert "derives from commit 0f1e2d3, not the checked-out one" in text
    assert "per-query ranks missing" in text  # its ranks could not be read: no paired difference
    with pytest.raises(report.ReportError, match="nope"):
        report.build_report(project, from_exp="nope")


def test_missing_workspace_metrics(project, monkeypatch):
    stub_dvc(monkeypatch, stdout="[]")
    (project / "metrics" / "Appliances" / "lora.json").unlink()
    (project / "metrics" / "Appliances" / "lora.detail.json").unlink()
    text = report.build_report(project)
    assert table_rows(text)[("Appliances", "LoRA")][0] == "— (run `dvc repro`)"


def test_a_project_evaluated_before_detail_files_had_it_all_in_the_metrics_file(project, monkeypatch):
    stub_dvc(monkeypatch, stdout="[]")
    for cat in ("Amazon_Fashion", "Appliances"):
        for variant in ("zeroshot", "lora"):
            detail = project / paths.metrics_detail_path(cat, variant)
            (project / paths.metrics_path(cat, variant)).write_text(detail.read_text())
            detail.unlink()
    rows = table_rows(report.build_report(project))
    assert rows[("Appliances", "LoRA")][:2] == ["0.350 [0.300, 0.400]", "0.550 [0.500, 0.600]"]


def test_cli_report(project, monkeypatch, capsys):
    stub_dvc(monkeypatch, stdout="[]")
    assert main(["--root", str(project), "report", "--category", "Appliances"]) == 0
    out = capsys.readouterr().out
    assert not any(cat == "Amazon_Fashion" for cat, _ in table_rows(out))
    assert main(["--root", str(project), "report", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["Amazon_Fashion"]["multimodal"]["mrr"]["lora"]["value"] == 0.4
    assert main(["--root", str(project), "report", "--from-exp", "nope"]) == 2
    assert "no finished experiment named 'nope'" in capsys.readouterr().err


def test_the_shopper_queries_mode_is_reported_like_the_others(project, monkeypatch):
    stub_dvc(monkeypatch, stdout="[]")
    cat = "Appliances"
    for variant, found in (("zeroshot", 20), ("lora", 60)):
        judged = [[[1 if i < found else 0, 3]] for i in range(N)]
        doc = with_queries(json.loads((project / paths.ranks_path(cat, variant)).read_text()), judged)
        (project / paths.ranks_path(cat, variant)).write_text(json.dumps(doc))
        detail = json.loads((project / paths.metrics_detail_path(cat, variant)).read_text())
        detail["queries"] = {"ndcg_at_10": found / N, "ci95": {"ndcg_at_10": {"low": 0.1, "high": 0.9}}}
        (project / paths.metrics_detail_path(cat, variant)).write_text(json.dumps(detail))
    data = json.loads(report.build_report_json(project))[cat]["queries"]
    assert data["ndcg_at_10"]["lora"] == {"value": 0.6, "ci_low": 0.1, "ci_high": 0.9}
    gain = data["ndcg_at_10"]["lora_minus_zeroshot"]
    assert gain["value"] == pytest.approx(0.4) and gain["significant"]
    assert data["recall_at_100"]["lora_minus_zeroshot"]["value"] == pytest.approx(0.4)
    assert "| Appliances | LoRA − zero-shot | shopper queries |" in report.build_report(project)
