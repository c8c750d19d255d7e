"""`symzoo report` and the run's summary on real stores: a store holding only an imported zoo (no analysis; its
curves from its checkpoints, or none where its table records no metrics) or analysis rows for some zoos is
reported as it is, with what is absent named in one line; a refused option ends in one line on stderr (exit 2)
before anything is written."""

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

import zoos
from pipeline.cli import app
from tests.zoos.test_importers import write_small_cnn_zoo
from tests.zoos.test_store import make_pop
from zoos.store import Store


def import_small_cnn_zoo(root, metrics: bool = True):
    write_small_cnn_zoo(root / "src", gz=False, metrics=metrics)
    store = root / "store"
    r = CliRunner().invoke(app, ["import", "small-cnn-zoo", str(root / "src"), str(store), "--zoo", "sc"])
    assert r.exit_code == 0, r.output
    return store


@pytest.fixture
def imported(tmp_path):
    """A store holding one imported Small CNN Zoo (`sc`, two models): models, checkpoints and the curves they
    give (their metrics at epochs 0 and 100), no analysis."""
    return import_small_cnn_zoo(tmp_path)


@pytest.fixture
def imported_bare(tmp_path):
    """The same zoo from a table without accuracy or loss columns: no metrics, so no curves."""
    return import_small_cnn_zoo(tmp_path, metrics=False)


@pytest.fixture
def trained(tmp_path):
    """A store of two trained zoos (zA, zB) of study `study` with curves; seed and lr vary, no load factor."""
    s = Store(str(tmp_path / "trained"))
    for pop in (make_pop("zA", [0, 2, 3], seed=1), make_pop("zB", [0, 2, 3, 4], seed=3)):
        s.write_population(pop)
    return s


def leftovers(folder):
    """Hidden folders a report was written into before its files moved (none may stay)."""
    return sorted(p.name for p in folder.iterdir() if ".report-" in p.name)


def test_a_store_of_an_imported_zoo_alone_is_reported_with_what_is_absent(imported, tmp_path):
    out = tmp_path / "o8"
    r = CliRunner().invoke(app, ["report", str(imported), "--no-log", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "absent from the store: analysis results (no stage has run on sc)" in r.stdout
    page = (out / "report.html").read_text()
    assert "2 models in 1 zoos (sc)" in page and "Absent from the store: analysis results" in page
    summary = pl.read_csv(out / "summary.csv")
    assert summary["zoo"].to_list() == ["sc"] and summary["models"].to_list() == [2] and "test_acc" in summary.columns
    assert (out / "final_metrics.png").exists() and (out / "training_curves.png").exists()  # drawn from checkpoints
    assert leftovers(tmp_path) == []


def test_an_imported_zoo_without_metrics_has_no_curves_and_the_report_says_so(imported_bare, tmp_path):
    from pipeline.report import absent

    out = tmp_path / "o9"
    r = CliRunner().invoke(app, ["report", str(imported_bare), "--no-log", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "absent from the store: training curves of sc; analysis results (no stage has run on sc)" in r.stdout
    assert not (out / "training_curves.png").exists()
    assert absent(zoos.open(str(imported_bare)), ["sc"], [], analysis=False) == \
        "absent from the store: training curves of sc"


def test_the_run_summary_of_a_stored_imported_zoo_with_a_stage_not_yet_run(imported, tmp_path):
    """What `symzoo run` summarises for {name: sc, stored: true} and {stage: equivariance} (runner._summarise)."""
    from pipeline.report import absent, summarise
    from pipeline.study import load_study

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"study": "reader", "store": str(imported), "output": str(tmp_path / "out"),
                                    "zoos": [{"name": "sc", "stored": True}], "analysis": [{"stage": "equivariance"}]}))
    study = load_study(str(path))
    out = study.output_dir()
    out.mkdir(parents=True)
    store = zoos.open(str(imported))
    summary, plot_paths, stage_plots = summarise(store, study, out)
    assert summary["zoo"].to_list() == ["sc"] and summary["ok"].to_list() == [2]
    assert sorted(p.name for p in plot_paths) == ["final_metrics.png", "training_curves.png"] and stage_plots == {}
    assert pl.read_csv(out / "summary.csv")["models"].to_list() == [2]
    assert absent(store, ["sc"], ["equivariance"]) == "absent from the store: analysis results (no stage has run on sc)"


def test_a_stage_with_nothing_to_compute_for_a_zoo_says_why(imported, tmp_path):
    """The imported zoo's two models differ in their activation: no pair shares an architecture config, so the
    study's interpolation has nothing to compute there, which its summary line says (not 'absent')."""
    from pipeline.report import absent, study_store
    from pipeline.study import load_study

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"study": "reader", "store": str(imported), "output": str(tmp_path / "out"),
                                    "zoos": [{"name": "sc", "stored": True}],
                                    "analysis": [{"stage": "interpolation"}, {"stage": "equivariance"}]}))
    study = load_study(str(path))
    store = zoos.open(str(imported))
    assert store.models().collect()["activation"].n_unique() == 2
    view = study_store(store, study)
    assert absent(view, ["sc"], ["interpolation", "equivariance"]) == (
        "absent from the store: equivariance results of sc; nothing to compute for interpolation in sc (no two of its "
        "models that trained share an architecture and task config)")


def test_analysis_rows_for_some_zoos_or_without_a_zoo_column(trained, tmp_path):
    """A stage's rows for zA only leave zB's cells empty and name zB absent; rows that carry model ids but no
    `zoo` column are given their models' zoos."""
    from pipeline.report import absent, summarise_zoos

    ids = trained.models().select("model_id", "zoo", "status").collect()
    za = ids.filter(pl.col("zoo") == "zA")["model_id"].to_list()
    trained.write_analysis("equivariance", "a", [{"model_id": m, "zoo": "zA", "equivariance_error": 0.1 * (i + 1),
                                                  "orbit_acc": 0.5} for i, m in enumerate(za)])
    out = tmp_path / "s1"
    out.mkdir()
    summary, _, stage_plots = summarise_zoos(trained, ["zA", "zB"], ["equivariance"], out)
    assert summary["zoo"].to_list() == ["zA", "zB"] and summary["equiv_error"][1] is None
    assert summary["equiv_error"][0] == pytest.approx(0.2)  # median of zA's two ok models (seed 1 diverges)
    assert list(stage_plots) == ["equivariance"]
    assert absent(trained, ["zA", "zB"], ["equivariance"]) == "absent from the store: equivariance results of zB"

    zb = ids.filter((pl.col("zoo") == "zB") & (pl.col("status") == "ok"))["model_id"].to_list()
    trained.write_analysis("equivariance", "b", [{"model_id": m, "equivariance_error": 0.7, "orbit_acc": 0.4}
                                                 for m in zb])  # a shard without the zoo column
    assert absent(trained, ["zA", "zB"], ["equivariance"]) == ""
    out = tmp_path / "r"
    r = CliRunner().invoke(app, ["report", str(trained.root), "--no-log", "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = pl.read_csv(out / "summary.csv")
    assert summary["zoo"].to_list() == ["zA", "zB"] and summary["equiv_error"].to_list() == pytest.approx([0.2, 0.7])
    page = (out / "report.html").read_text()
    assert "analysis stages: equivariance" in page and "Absent from the store" not in page


REFUSED = [
    (["--temperature", "bogus", "--no-log"], ["--temperature 'bogus' is not a column"]),
    (["--load", "bogus", "--no-log"], ["--load 'bogus' is not a column"]),
    (["--load", "seed", "--temperature", "seed", "--no-log"], ["--temperature 'seed'", "--load 'seed'"]),
    (["--load", "lr", "--no-log"], ["--temperature 'lr'", "--load 'lr'"]),  # lr is also the default temperature
    (["--tracking-uri", "notascheme:///x"], ["--tracking-uri 'notascheme:///x'", "'notascheme'", "sqlite:///",
                                             "http(s)://"]),
    (["--tracking-uri", "http://127.0.0.1:9"], ["--tracking-uri 'http://127.0.0.1:9'", "cannot be reached"]),
    (["--study", "nope", "--no-log"], ["study 'nope'"]),
]


@pytest.mark.parametrize("args,named", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_a_refused_option_writes_nothing(trained, tmp_path, args, named):
    out = tmp_path / "reports" / "r2"
    r = CliRunner().invoke(app, ["report", str(trained.root), "--out", str(out), *args])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.stderr
    assert all(n in lines[0] for n in named), lines[0]
    assert "',." not in lines[0], "a message cut mid-list"
    assert not (tmp_path / "reports").exists() and leftovers(tmp_path) == []


def test_an_existing_output_folder_keeps_its_files_and_a_late_failure_leaves_it_as_it_was(trained, tmp_path):
    out = tmp_path / "study_out"
    out.mkdir()
    (out / "keep.txt").write_text("the run's own file")
    (out / "summary.csv").mkdir()  # the report writes a file there: it fails after writing its files elsewhere
    r = CliRunner().invoke(app, ["report", str(trained.root), "--no-log", "--out", str(out)])
    assert r.exit_code == 2 and "summary.csv is a folder" in r.stderr and "nothing written" in r.stderr, r.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "summary.csv"] and leftovers(tmp_path) == []

    (out / "summary.csv").rmdir()
    r = CliRunner().invoke(app, ["report", str(trained.root), "--no-log", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert {"keep.txt", "report.html", "summary.csv", "training_curves.png"} <= {p.name for p in out.iterdir()}
    assert (out / "keep.txt").read_text() == "the run's own file" and leftovers(tmp_path) == []

    blocker = tmp_path / "afile"
    blocker.write_text("")
    r = CliRunner().invoke(app, ["report", str(trained.root), "--no-log", "--out", str(blocker / "o")])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and str(blocker) in r.stderr, r.output


def test_symzoo_run_on_an_imported_zoo_names_what_is_absent(imported_bare, tmp_path, ray_local):
    """`symzoo run` of a study reading an imported zoo without metrics (stored: true) runs its stage and says,
    under its summary, that the store has no training curves of it."""
    from tests.zoos.test_importers import write_mnist

    write_mnist(tmp_path / "data" / "mnist", n_test=64)
    study = {"study": "reader", "store": str(imported_bare), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
             "output": str(tmp_path / "out"), "data_dir": str(tmp_path / "data"),
             "zoos": [{"name": "sc", "stored": True}], "analysis": [{"stage": "equivariance", "samples": 16}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    r = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 0, r.output
    assert "Absent from the store: training curves of sc\n" in r.output, r.output
    assert zoos.open(str(imported_bare)).analysis("equivariance").collect().height == 2
