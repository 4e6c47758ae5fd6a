"""``agc-sx train``: our own crossed jet–parton assignment BDTs from generated ttbar events."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from ..capture import captured
from ..catalogue import load_catalog
from ..ml import DEFAULT_OUTPUT, MODEL_EVEN, MODEL_ODD
from ..resources import default_models_dir
from ._group import fail, main, user_errors
from ._output import echo_captured, verbose_option

MODEL_FILES = (MODEL_EVEN, MODEL_ODD)


@main.command("train")
@click.option("--catalog", "catalog_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Catalogue whose ttbar__nominal files (NanoAOD with GenPart, e.g. from the generator) are used.")
@click.option("--events", type=click.IntRange(min=1), default=None,
              help="Read at most this many events in total [default: all].")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUTPUT,
              show_default=True, help="Directory for model_even.json, model_odd.json and the README.md model card "
                                      "(use them with `agc-sx process --models`).")
@click.option("--force", is_flag=True,
              help="Overwrite models already in OUTPUT, even the bundled ones `agc-sx process` uses by default.")
@click.option("--seed", type=click.IntRange(min=0), default=1, show_default=True, help="XGBoost random seed.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="XGBoost threads [default: all cores].")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help="Boosting rounds per model [default: 200, see agc_sx.ml.HYPERPARAMETERS].")
@verbose_option
@user_errors(OSError)
def train_command(catalog_path: Path, events: int | None, output: Path, force: bool, seed: int,
                  threads: int | None, rounds: int | None, verbose: bool) -> None:
    """Train the two crossed jet–parton assignment BDTs (even / odd event numbers) on truth-matched ttbar."""
    from ..ml import ModelError, TrainingError, train  # heavy (xgboost, numba): only when training

    if not force:
        refuse_overwrite(output)
    catalog = load_catalog(catalog_path)
    try:
        with captured(output / "train.log", verbose=verbose) as capture:
            report = train(catalog, events=events, output=output, seed=seed, nthread=threads,
                           num_boost_round=rounds)
    except (TrainingError, ModelError) as err:
        fail(str(err))
        return
    click.echo(
        f"trained on {report.events_matched:,} truth-matched 4j2b events ({report.permutations:,} permutations) "
        f"from {report.events_read:,} events in {report.train_seconds:.0f} s"
    )
    click.echo(f"held-out hadronic-top jets correct: BDT {100 * report.accuracy_bdt:.1f} %, "
               f"trijet max-pT {100 * report.accuracy_trijet:.1f} %")
    click.echo(f"wrote {output}/model_even.json, model_odd.json, README.md")
    echo_captured(capture)


def refuse_overwrite(output: Path) -> None:
    """Stop (one line) before models in ``output`` are replaced: the bundled ones, or an earlier training's."""
    with contextlib.suppress(FileNotFoundError):
        if output.resolve() == default_models_dir().resolve():
            fail(f"{output} holds the bundled models that `agc-sx process` uses; choose another --output, "
                 "or --force to replace them")
    existing = [name for name in MODEL_FILES if (output / name).exists()]
    if existing:
        fail(f"{output} already holds {', '.join(existing)}; choose another --output, or --force to replace them")
