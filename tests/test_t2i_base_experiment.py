"""experiments/t2i_base.py keeps scores in its workdir, marked with the classifier and the evaluation
flags that gave them; a run that asks for others is refused before training, naming each file and
key, and changes nothing."""

import hashlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFIER = "experiments/results/shapes_classifier.npz"


def test_scores_judged_otherwise_are_refused_before_training_and_kept(tmp_path):
    workdir, results = tmp_path / "work", tmp_path / "results"
    workdir.mkdir()
    with open(os.path.join(ROOT, CLASSIFIER), "rb") as file:
        digest = hashlib.sha256(file.read()).hexdigest()
    as_asked = {"classifier": CLASSIFIER, "classifier_sha256": digest, "num_prompts": 8}
    judged_otherwise = {
        "classifier": "elsewhere/classifier.npz",
        "classifier_sha256": "0" * 64,
        "num_prompts": 512,
        "scales": ["1", "2", "4", "7.5"],
        "sampler": "dpm_solver_pp",
        "steps": 25,
        "num_showcase": 6,
        "showcase_seeds": 6,
    }
    (workdir / "vae_ceiling.json").write_text(json.dumps(as_asked))
    (workdir / "evaluation.json").write_text(json.dumps(judged_otherwise))
    kept = {path.name: path.read_bytes() for path in workdir.iterdir()}

    command = [
        sys.executable,
        "-m",
        "experiments.t2i_base",
        f"--workdir={workdir}",
        f"--results={results}",
        f"--base={tmp_path / 'base'}",
        "--num_prompts=8",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    assert run.returncode != 0
    error = run.stderr.strip().splitlines()[-1]
    assert f"--workdir='{workdir}'" in error, error
    assert "'evaluation.json'" in error and "'num_prompts': (512, 8)" in error, error
    assert f"'classifier': ('elsewhere/classifier.npz', '{CLASSIFIER}')" in error, error
    assert "vae_ceiling.json" not in error and "'scales'" not in error, error
    assert {path.name: path.read_bytes() for path in workdir.iterdir()} == kept
    assert not results.exists() and not (tmp_path / "base").exists()
