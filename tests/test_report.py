"""cliprec.report: values with CIs, paired differences; `dvc exp show --json` stubbed by a captured answer."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
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
BASE_REV = "27abee77bc446f229a96d5be11ea35611b58c0e0"  # the commit the experiments derive from
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


def git_commit(project: Path, message: str) -> str:
    """Commit everything in `project` (a git repo is made on first use); returns the commit."""
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t"]
    if not (project / ".git").exists():
        subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", message], check=True)
    return subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def set_lora(project: Path, top5: int, amp: bool, extra: float = 0.2) -> None:
    """The workspace's LoRA ranks and metrics as a run with `top5` hits, and params.yaml's `amp`."""
    params = project / "params.yaml"
    params.write_text(params.read_text().replace(f"amp: {str(not amp).lower()}", f"amp: {str(amp).lower()}"))
    for cat, base in (("Amazon_Fashion", 0.1), ("Appliances", 0.15)):
        (project / "metrics" / cat / "lora.ranks.json").write_text(json.dumps(ranks(top5)))
        write_metrics(project, cat, "lora", metrics_file(base + extra, 0.8))


def commit_runs(project: Path, amp_top5: int = 52) -> tuple[str, str]:
    """(fp32 baseline commit, AMP experiment commit): the workspace left as the AMP run, as `dvc exp run`
    leaves it; the baseline's LoRA has the fixture's 50 top-5 hits."""
    base = git_commit(project, "fp32")
    set_lora(project, amp_top5, amp=True, extra=0.22)
    return base, git_commit(project, "amp")


def exp_show_of(base: str, amp: str) -> str:
    """The captured `dvc exp show --json`, its baseline and `amp-lr` experiment made these two commits."""
    return EXP_SHOW_JSON.replace(BASE_REV, base).replace(AMP_REV, amp)


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
    base, amp = commit_runs(project)
    stub_dvc(monkeypatch, stdout=exp_show_of(base, amp))
    data = json.loads(report.build_report_json(project))
    r5 = data["Appliances"]["text_to_image"]["recall_at_5"]
    assert r5["zeroshot"] == {"value": 0.35, "ci_low": 0.3, "ci_high": 0.4}
    assert r5["lora"]["value"] == pytest.approx(0.57)  # the workspace: `dvc exp run` applied the AMP run
    # the experiment's and its baseline's detail files, read from their commits: DVC shows only headlines
    assert r5["lora_amp"] == pytest.approx({"value": 0.57, "ci_low": 0.52, "ci_high": 0.62})
    assert r5["lora_base"] == pytest.approx({"value": 0.55, "ci_low": 0.5, "ci_high": 0.6})
    d = r5["lora_minus_zeroshot"]
    assert d["value"] == pytest.approx(0.32) and d["ci_low"] > 0 and d["p_value"] < 0.001 and d["significant"]
    assert d["between"] == {"new": {"run": "workspace", "rev": "workspace"}, "old": d["between"]["new"]}
    amp_d = r5["lora_amp_minus_lora"]  # 2 more queries in the top 5 than its fp32 baseline: not significant
    assert amp_d["value"] == pytest.approx(0.02) and amp_d["p_value"] > 0.05 and not amp_d["significant"]
    assert amp_d["between"] == {
        "new": {"run": f"exp `amp-lr`, {amp[:7]}", "rev": amp},
        "old": {"run": f"commit {base[:7]}", "rev": base},
    }
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
    r5 = diffs[("Appliances", "LoRA − zero-shot (workspace)", "T→I")][1]
    assert r5.startswith("+0.300 [") and r5.endswith("(Holm 0.004) ▲")  # p = 1/10,001, 40 tests
    assert diffs[("Appliances", "LoRA − zero-shot (workspace)", "T→I")][0].startswith(
        "+0.000"
    )  # R@1: no rank 1
    assert not any("LoRA+AMP" in label for _, label, _ in diffs)  # no AMP run, no AMP difference
    assert "the workspace LoRA row is itself an AMP run" not in text


def test_amp_is_compared_with_its_baseline_commit_not_the_workspace(project, monkeypatch):
    base, amp = commit_runs(project, amp_top5=60)
    stub_dvc(monkeypatch, stdout=exp_show_of(base, amp))
    text = report.build_report(project)
    label = f"LoRA+AMP (exp `amp-lr`, {amp[:7]}) − LoRA (commit {base[:7]})"
    r5 = diff_rows(text)[("Appliances", label, "T→I")][1]
    assert r5.startswith("+0.100 [")  # the workspace is the AMP run: against it, this would be +0.000, p=1
    assert table_rows(text)[("Appliances", f"LoRA (commit {base[:7]})")][1] == "0.550 [0.500, 0.600]"
    assert f"LoRA+AMP − LoRA is between exp `amp-lr`, {amp[:7]} (AMP) and commit {base[:7]}." in text
    assert "the workspace LoRA row is itself an AMP run" in text


def test_against_names_the_run_to_compare_with(project, monkeypatch):
    base, amp = commit_runs(project, amp_top5=60)
    stub_dvc(monkeypatch, stdout=EXP_SHOW_JSON.replace(AMP_REV, amp))  # its baseline is not in this repo
    text = report.build_report(project)
    assert f"per-query ranks missing in commit {BASE_REV[:7]}" in text
    data = json.loads(report.build_report_json(project, against="HEAD~1"))
    amp_d = data["Amazon_Fashion"]["image_to_text"]["mrr"]["lora_amp_minus_lora"]
    assert amp_d["value"] > 0 and amp_d["between"]["old"] == {"run": f"commit {base[:7]}", "rev": base}
    with pytest.raises(report.ReportError, match="names the AMP run itself"):
        report.build_report(project, against="HEAD")
    with pytest.raises(report.ReportError, match="'nope' names no finished experiment and no git revision"):
        report.build_report(project, against="nope")
    # an experiment as the other run: its params have amp: true, so the report says it is no fp32 run
    set_lora(project, 55, amp=True)
    other = git_commit(project, "another amp run")
    stub_dvc(
        monkeypatch, stdout=exp_show_of(base, amp).replace("19f57df9ad4d54660363e9a7a2273933a82490b5", other)
    )
    text = report.build_report(project, from_exp="amp-lr", against="amp-on")
    assert f"LoRA+AMP (exp `amp-lr`, {amp[:7]}) − LoRA (exp `amp-on`, {other[:7]})" in text
    assert "has `amp: true` too: that difference is not AMP against fp32" in text


def test_workspace_with_amp_and_no_experiment(project, monkeypatch):
    base, _ = commit_runs(project, amp_top5=60)
    stub_dvc(monkeypatch, stdout="[]")
    text = report.build_report(project)
    assert "no AMP experiment was found: there is no fp32 run to compare with" in text
    assert not any("LoRA+AMP (" in label for _, label, _ in diff_rows(text))
    assert "LoRA+AMP − LoRA is between" not in text
    text = report.build_report(project, against="HEAD~1")  # the workspace is the AMP run: compare it
    label = f"LoRA+AMP (workspace) − LoRA (commit {base[:7]})"
    assert diff_rows(text)[("Appliances", label, "T→I")][1].startswith("+0.100 [")


def test_significance_survives_holms_correction_only(project, monkeypatch):
    # 6 of 100 queries move into the top 5: raw p = 2/64 on each of 32 tests of the family, Holm 1
    base, amp = commit_runs(project, amp_top5=56)
    stub_dvc(monkeypatch, stdout=exp_show_of(base, amp))
    report_json, notes = report.report_data(project)
    amp_d = report_json["Appliances"]["text_to_image"]["recall_at_5"]["lora_amp_minus_lora"]
    assert amp_d["p_value"] < 0.05 < amp_d["p_holm"] and not amp_d["significant"]
    gain = report_json["Appliances"]["text_to_image"]["recall_at_5"]["lora_minus_zeroshot"]
    assert gain["p_holm"] < 0.05 and gain["significant"]  # 36 more queries: survives a family of 40
    assert notes["family"] == {"lora_minus_zeroshot": 40, "lora_amp_minus_lora": 40}
    text = report.build_report(project)
    label = f"LoRA+AMP (exp `amp-lr`, {amp[:7]}) − LoRA (commit {base[:7]})"
    cell = diff_rows(text)[("Appliances", label, "T→I")][1]
    assert re.fullmatch(r"\+0\.060 \[.*\] p=0\.0[23]\d* \(Holm 1\)", cell)  # no ▲: raw p alone would mark it
    assert "LoRA − zero-shot over its 40 differences" in text and "Holm's correction" in text


def test_unpaired_experiment_is_said_not_compared(project, monkeypatch):
    (project / "metrics" / "Appliances" / "lora.ranks.json").write_text(json.dumps(ranks_doc([2] * 50)))
    base = git_commit(project, "fp32 on another test set")
    set_lora(project, 52, amp=True)
    amp = git_commit(project, "amp")
    stub_dvc(monkeypatch, stdout=exp_show_of(base, amp))
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
    row = table_rows(text)[("Amazon_Fashion", "LoRA+AMP (exp `amp-on`, 19f57df)")]
    assert row[0] == "0.310"  # a file without CIs: DVC's headline
    assert "derives from commit 0f1e2d3, not the checked-out one" in text
    assert "per-query ranks missing" in text  # its ranks could not be read: no paired difference
    with pytest.raises(report.ReportError, match="nope"):
        report.build_report(project, from_exp="nope")
    assert "Experiment `lr-up` does not have `amp: true`" in report.build_report(project, from_exp="lr-up")
    with pytest.raises(report.ReportError, match="no AMP run to compare with it"):
        report.build_report(project, against="HEAD")  # the workspace has amp: false, no AMP experiment


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


def noise_doc(digest: str, gallery: int = N) -> dict:
    """A noise.detail.json as `cliprec noise` writes it: LoRA R@5 over 5 seeds, zero-shot fixed."""
    diff = {"pairs": 20, "sd": 0.04, "q025": -0.07, "q975": 0.07, "min": -0.07, "max": 0.07}
    lora = {"values": [0.55, 0.5, 0.52, 0.48, 0.55], "mean": 0.52, "sd": 0.03, "min": 0.48, "max": 0.55}
    lora["diff"] = diff
    zeroshot = {"values": [0.35] * 5, "mean": 0.35, "sd": 0.0, "min": 0.35, "max": 0.35}
    zeroshot["diff"] = {k: 0 if k != "pairs" else 20 for k in diff}
    gain = {"values": [0.2, 0.15, 0.17, 0.13, 0.2], "mean": 0.17, "sd": 0.03, "min": 0.13, "max": 0.2}
    return {
        "category": "Appliances", "seeds": [0, 1, 2, 3, 4], "runs": {"0": "workspace"}, "base": "abcdef0123",
        "test_set": {"ids_sha256": digest, "gallery_size": gallery},
        "variants": {"lora": {"text_to_image": {"recall_at_5": lora}},
                     "zeroshot": {"text_to_image": {"recall_at_5": zeroshot}}},
        "lora_minus_zeroshot": {"text_to_image": {"recall_at_5": gain}},
        "resamples": 10000, "seconds": 512.3,
    }  # fmt: skip


def test_seed_spread_from_the_noise_file(project, monkeypatch):
    base, amp = commit_runs(project, amp_top5=60)
    stub_dvc(monkeypatch, stdout=exp_show_of(base, amp))
    digest = ranks(50)["test_set"]["ids_sha256"]
    (project / paths.noise_detail_path("Appliances")).write_text(json.dumps(noise_doc(digest)))
    data = json.loads(report.build_report_json(project))
    r5 = data["Appliances"]["text_to_image"]["recall_at_5"]
    assert r5["lora"]["seeds"] == {"n": 5, "mean": 0.52, "sd": 0.03, "min": 0.48, "max": 0.55}
    assert r5["zeroshot"]["seeds"]["sd"] == 0.0
    assert r5["lora_minus_zeroshot"]["seeds"]["mean"] == 0.17
    amp_d = r5["lora_amp_minus_lora"]  # +0.10: outside what retraining alone moves R@5 by
    assert amp_d["retrain"] == {"pairs": 20, "sd": 0.04, "q025": -0.07, "q975": 0.07}
    assert amp_d["inside_retrain_range"] is False
    assert "seeds" not in data["Amazon_Fashion"]["text_to_image"]["recall_at_5"]["lora"]
    text = report.build_report(project)
    rows = table_rows(text)
    assert rows[("Appliances", "LoRA, 5 training seeds")][1] == "0.520 ± 0.030"
    assert rows[("Appliances", "LoRA, 5 training seeds")][0] == "—"  # R@1 not in this noise file
    assert rows[("Amazon_Fashion", "LoRA, training seeds")][1] == "—"
    diffs = diff_rows(text)
    assert diffs[("Appliances", "↳ 5 training seeds, mean ± sd", "T→I")][1] == "+0.170 ± 0.030"
    assert diffs[("Appliances", "↳ retraining alone, 95 % range", "T→I")][1] == "-0.070..+0.070"
    hint = "make it with `cliprec noise --seeds 1 2 3 4`"
    assert f"no metrics/<cat>/noise.detail.json for Amazon_Fashion (—): {hint}" in text
    assert (
        "Seed spread (Appliances): mean ± sd over training seeds [0, 1, 2, 3, 4], retrained from "
        "commit abcdef0" in text
    )


def test_a_noise_file_of_another_test_set_is_not_used(project, monkeypatch):
    stub_dvc(monkeypatch, stdout="[]")
    (project / paths.noise_detail_path("Appliances")).write_text(json.dumps(noise_doc("0" * 64)))
    text = report.build_report(project)
    assert table_rows(text)[("Appliances", "LoRA, training seeds")][1] == "—"
    assert (
        "metrics/Appliances/noise.detail.json was measured on another test set: rerun `cliprec noise" in text
    )


# --- a real `dvc exp run` on a tiny pipeline --------------------------------------------------------------

# The pipeline's one stage stands in for train + evaluate: it ranks 100 test queries, LoRA's ranks
# improving with `epochs` and `amp` moving some of them, and writes the files the evaluate stage writes.
TINY_STAGE = """\
import json
from pathlib import Path

import numpy as np
import yaml

from cliprec.metrics import metrics_from_ranks

p = yaml.safe_load(Path("params.yaml").read_text())
out = Path("metrics/Amazon_Fashion")
out.mkdir(parents=True, exist_ok=True)
zeroshot = np.random.default_rng(0).integers(1, 40, size=100)
lora = np.maximum(1, zeroshot // (1 + p["epochs"]))
if p["amp"]:
    lora[::3] += 7
for variant, ranks in (("zeroshot", zeroshot), ("lora", lora)):
    doc = {"test_set": {"ids_sha256": "tiny", "gallery_size": 100}, "ks": [1, 5, 10],
           "ids": [f"P{i:03d}" for i in range(100)], "ranks": {"text_to_image": ranks.tolist()}}
    (out / f"{variant}.ranks.json").write_text(json.dumps(doc))
    detail = {"text_to_image": {**metrics_from_ranks(ranks), "gallery_size": 100}}
    for name in (f"{variant}.detail.json", f"{variant}.json"):
        (out / name).write_text(json.dumps(detail))
"""
TINY_DVC_YAML = """\
stages:
  evaluate:
    cmd: python evaluate_tiny.py
    deps:
      - evaluate_tiny.py
    params:
      - amp
      - epochs
    outs:
      - metrics/Amazon_Fashion/zeroshot.ranks.json:
          cache: false
      - metrics/Amazon_Fashion/lora.ranks.json:
          cache: false
      - metrics/Amazon_Fashion/zeroshot.detail.json:
          cache: false
      - metrics/Amazon_Fashion/lora.detail.json:
          cache: false
    metrics:
      - metrics/Amazon_Fashion/zeroshot.json:
          cache: false
      - metrics/Amazon_Fashion/lora.json:
          cache: false
"""


def run_in(root: Path, *cmd: str) -> str:
    """Run a command in root with this checkout importable; fail the test with its output when it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow  # ~15 s: five dvc commands
@pytest.mark.skipif(not (shutil.which("dvc") and shutil.which("git")), reason="needs dvc and git")
def test_after_dvc_exp_run_amp_the_report_compares_it_with_its_baseline_commit(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(categories=["Amazon_Fashion"], epochs=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "evaluate_tiny.py").write_text(TINY_STAGE)
    (root / "dvc.yaml").write_text(TINY_DVC_YAML)
    run_in(root, "git", "init", "-q")
    run_in(root, "dvc", "init", "-q")
    run_in(root, "dvc", "repro", "-q")
    run_in(root, "git", "add", "-A")
    run_in(root, "git", "commit", "-qm", "fp32, 1 epoch")
    base = run_in(root, "git", "rev-parse", "HEAD").strip()
    run_in(root, "dvc", "exp", "run", "-q", "-S", "amp=true", "-S", "epochs=2")
    (exp,) = report.parse_experiments(json.loads(run_in(root, "dvc", "exp", "show", "--json")))
    text = run_in(root, sys.executable, "-m", "cliprec.cli", "report")
    label = f"LoRA+AMP (exp `{exp.name}`, {exp.rev[:7]}) − LoRA (commit {base[:7]})"
    cells = diff_rows(text)[("Amazon_Fashion", label, "T→I")]
    assert all(not c.startswith("+0.000") for c in cells[1:]), cells  # R@5.. moved: not the workspace
    assert (
        table_rows(text)[("Amazon_Fashion", "LoRA")]
        == table_rows(text)[("Amazon_Fashion", label.split(" − ")[0])]
    )
    data = json.loads(run_in(root, sys.executable, "-m", "cliprec.cli", "report", "--json"))
    mrr = data["Amazon_Fashion"]["text_to_image"]["mrr"]["lora_amp_minus_lora"]
    assert mrr["value"] != 0 and mrr["p_value"] < 1
    assert mrr["between"] == {"new": {"run": f"exp `{exp.name}`, {exp.rev[:7]}", "rev": exp.rev},
                              "old": {"run": f"commit {base[:7]}", "rev": base}}  # fmt: skip


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
    assert "| Appliances | LoRA − zero-shot (workspace) | shopper queries |" in report.build_report(project)
