"""The memory table's arithmetic: ZeRO's bytes per parameter, and the preset sizes it is applied to."""

from __future__ import annotations

import pytest

from benchmarks.memory import STAGES, bytes_per_param, preset_sizes, table


def test_bytes_per_parameter_follow_the_zero_paper():
    # mixed-precision Adam: 2 + 2 + 12 bytes a parameter (ZeRO paper, sec. 3), plus our 4-byte EMA, sharded
    assert bytes_per_param("ddp", 1) == 20
    assert bytes_per_param("zero1", 8) == pytest.approx(2 + 2 + 12 / 8 + 0.5)
    assert bytes_per_param("zero2", 8) == pytest.approx(2 + 14 / 8 + 0.5)
    assert bytes_per_param("zero3", 64) == pytest.approx(20 / 64)
    per_stage = [bytes_per_param(stage, 8) for stage in STAGES]
    assert per_stage == sorted(per_stage, reverse=True)
    with pytest.raises(ValueError):
        bytes_per_param("zero4", 8)


def test_preset_sizes_match_the_paper_scale():
    sizes = preset_sizes()
    assert 1.1e9 < sizes["prior paper_1b"] < 1.3e9  # the paper's 1B prior
    assert 3.3e9 < sizes["decoder paper64 + GLIDE text"] < 3.7e9  # GLIDE's 3.5B decoder
    assert 0.6e9 < sizes["upsampler paper256"] < 0.8e9  # App. C: 700M
    assert 0.25e9 < sizes["upsampler paper1024"] < 0.35e9  # App. C: 300M
    rows = table(8, 80).splitlines()
    assert len(rows) == 2 + len(sizes) and "| decoder paper64 + GLIDE text | 3.56B | 54.8 tight |" in table(8, 80)


def test_the_prior_recipe_costs_what_the_transformer_rule_says():
    """Counted FLOPs of the paper prior against the independent estimate 6 x parameters x tokens
    (forward 2, backward 4, per parameter and token), and the GPU-hours arithmetic."""
    from benchmarks.cost import OUR_MFU, cost, entrypoint

    row = cost(["experiment=paper_prior"], None, 989.0)
    params = preset_sizes()["prior paper_1b"]  # (its ViT-L width; ViT-H's differs by a few projections)
    tokens = 77 + 4  # the caption's tokens, text embedding, timestep, noised embedding, query
    assert row["flops_per_sample"] == pytest.approx(6 * params * tokens, rel=0.15)
    assert row["samples"] == 4096 * 600_000 and row["flops"] == row["flops_per_sample"] * row["samples"]
    assert row["mfu"] == OUR_MFU["prior"]
    assert row["gpu_hours"] == pytest.approx(row["flops"] / (0.430 * 989e12) / 3600)
    assert entrypoint(["experiment=paper_up1024"]) == "upsampler"
    with pytest.raises(ValueError, match="name an experiment"):
        entrypoint(["model/prior=tiny"])


def test_train_step_times_the_real_trainer_and_appends_a_row(tmp_path, monkeypatch, capsys):
    """A few steps of the tiny prior through train.run; the steady rate comes from metrics.jsonl. A
    configuration that crashes (as a lever did inside the optimizer on an H200) is reported as a
    failed line and the next one still runs; the exit says how many failed."""
    import csv

    from benchmarks import train_step

    measure = train_step.measure

    def crashing_on_seed_13(entry, config, *args, **kwargs):
        if "trainer.seed=13" in config:
            raise RuntimeError("params, grads, exp_avgs, and exp_avg_sqs must have same dtype, device, and layout")
        return measure(entry, config, *args, **kwargs)

    monkeypatch.setattr(train_step, "measure", crashing_on_seed_13)
    out = tmp_path / "rows.csv"
    args = ["prior", "model/prior=tiny", "model/clip=tiny", "trainer.batch_per_gpu=16", "data.num_workers=0"]
    options = ["--steps", "6", "--warmup", "2", "--samples", "200", "--workdir", str(tmp_path), "--csv", str(out)]
    with pytest.raises(SystemExit, match="1 of 3 configurations failed"):
        train_step.main([*args, *options, "--compare", "trainer.seed=13", "--compare", "trainer.batch_per_gpu=8"])
    assert "| prior model/prior=tiny" in capsys.readouterr().out.split("failed: RuntimeError: params, grads")[0]
    first, last = list(csv.DictReader(out.open()))
    assert first["entry"] == "prior" and first["batch"] == "16" and first["device"].startswith("CPU")
    assert last["batch"] == "8"  # the configuration after the crash ran
    assert float(first["images_per_s"]) == pytest.approx(16 * float(first["steps_per_s"]), rel=0.01)
    assert float(first["gflop_per_sample"]) > 0 and first["mfu"] == ""  # no peak FLOP/s for a CPU
    assert "torch" in first["versions"]
    # timing runs end without a checkpoint or an export (trainer.save_at_end=false): a 1B model's is 16 GB
    assert not list(tmp_path.glob("runs/*/checkpoints/step_*")) and not list(tmp_path.glob("runs/*/export"))


def test_train_step_profiles_the_steps_after_warmup_and_times_the_rest(tmp_path, capsys):
    import csv

    from benchmarks import train_step

    out = tmp_path / "rows.csv"
    args = ["prior", "model/prior=tiny", "model/clip=tiny", "trainer.batch_per_gpu=16", "data.num_workers=0"]
    options = ["--steps", "7", "--warmup", "2", "--profile", "2", "--samples", "200", "--workdir", str(tmp_path)]
    train_step.main([*args, *options, "--csv", str(out)])
    printed = capsys.readouterr().out
    assert "steps 3..4 of rank 0, sorted by self_cpu_time_total" in printed and "aten::" in printed
    assert len(list(tmp_path.glob("runs/*/profile/trace_rank0.json"))) == 1
    (row,) = list(csv.DictReader(out.open()))
    assert row["overrides"] == " ".join(args[1:]) and float(row["steps_per_s"]) > 0  # timed after the window
    with pytest.raises(SystemExit):
        train_step.main([*args, "--steps", "5", "--warmup", "2", "--profile", "2", "--csv", str(out)])
    assert "--steps 5 must exceed --warmup + --profile + 1" in capsys.readouterr().err


def test_every_gpu_matrix_row_times_one_micro_batch_per_step(tmp_path):
    """The paper decoder's experiment accumulates 64 micro-batches a step (batch 2048): timed as it is,
    its 11 steps outlasted a GPU call (2026-12-04). Every training row of the GPU matrix steps once per
    micro-batch."""
    from benchmarks.matrix import rows
    from train.config import compose, resolve_batch, to_object

    training = [r for r in rows(False, tmp_path / "m.csv", ".peer") if r.argv[0] == "benchmarks.train_step"]
    assert len(training) >= 5
    for row in training:
        entry, *rest = row.argv[3:]  # after benchmarks.train_step --csv PATH
        overrides = [a for a in rest[: next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]]
        job = to_object(compose(entry, [*overrides, "data.shards=unused"]))
        assert resolve_batch(job.trainer, 1)[1] == 1, row.name


def test_the_matrix_runs_what_fits_and_lists_the_rest(tmp_path, monkeypatch):
    """Rows in order under the budget, each in its own process; a row that no longer fits is listed as
    not run; --from N starts a second session at row N, with a report of its own."""
    from benchmarks import matrix

    quick, long = matrix.Row("quick", ["platform"], 1), matrix.Row("long", ["platform"], 10_000)
    monkeypatch.setattr(matrix, "rows", lambda tiny, csv, peer_dir: [quick, long])
    assert matrix.main(["--out", str(tmp_path), "--budget-s", "120"]) == 0
    report = (tmp_path / "gpu_matrix.md").read_text()
    assert "## quick: ok" in report and "## long: not run" in report
    assert matrix.main(["--out", str(tmp_path), "--budget-s", "120", "--from", "1"]) == 0
    second = (tmp_path / "gpu_matrix_from1.md").read_text()
    assert "quick" not in second and "## long: not run" in second


def _embedding_folder(root, captions, embeddings, keys=None):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    for kind in ("img", "text"):
        (root / f"{kind}_emb").mkdir(parents=True)
        np.save(root / f"{kind}_emb" / f"{kind}_emb_00000.npy", embeddings.astype(np.float32))
    (root / "metadata").mkdir()
    keys = keys or [f"{i:09d}" for i in range(len(captions))]
    pq.write_table(pa.table({"key": keys, "caption": captions}), root / "metadata" / "metadata_00000.parquet")
    return str(root)


def test_the_clip_probe_reads_what_the_embedding_carries_and_nothing_more(tmp_path, capsys):
    """benchmarks.clip_probe on embeddings that encode color but not shape: color is read back, shape
    stays at chance, which is what it showed of the demo CLIP on moved shapes."""
    import numpy as np

    from benchmarks.clip_probe import main
    from data.scenes import SHAPES

    rng = np.random.default_rng(0)
    colors, shapes = ["red", "green", "blue", "yellow"], list(SHAPES)[:4]

    def split(name, n):
        c, s = rng.integers(0, 4, n), rng.integers(0, 4, n)
        captions = [f"a {colors[i]} {shapes[j]} on a white background" for i, j in zip(c, s)]
        emb = np.eye(4)[c] * 3 + rng.normal(size=(n, 4)) * 0.3  # color only, no trace of the shape
        return _embedding_folder(tmp_path / name, captions, np.concatenate([emb, rng.normal(size=(n, 4))], 1))

    main(["--train", split("train", 800), "--heldout", split("heldout", 200), "--steps", "200"])
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in capsys.readouterr().out.splitlines()[3:]}
    accuracy = {k: float(v[0].strip(" %")) for k, v in rows.items()}
    chance = {k: float(v[1].strip(" %")) for k, v in rows.items()}
    assert accuracy["color"] > 95 and accuracy["shape"] < 40 and chance["background"] == 100


def test_oracle_score_draws_once_per_guidance_scale(monkeypatch, capsys):
    """`score --guidance 1 4`: the scenes are drawn and read back at each scale, a result line each;
    without it, once at the decoder's own scale."""
    from benchmarks import oracle_embeddings as oracle

    drawn_at = []
    reading = {"images": 4, "shape": 0.5, "color": 1.0, "background": 1.0, "all": 0.5, "centre_error": 0.1}
    monkeypatch.setattr(oracle, "load", lambda *args: (None, []))
    monkeypatch.setattr(oracle, "oracle_embeds", lambda *args: None)
    monkeypatch.setattr(oracle, "x0_by_noise_level", lambda *args: {})
    monkeypatch.setattr(
        oracle, "score_decoder", lambda pipe, s, e, g: drawn_at.append(g) or reading | {"by_shape": {"star": 0.5}}
    )
    oracle.main(["score", "--stack", "s", "--decoder", "d", "--guidance", "1", "4"])
    assert drawn_at == [1.0, 4.0]
    lines = [line for line in capsys.readouterr().out.splitlines() if "oracle embeddings" in line]
    assert len(lines) == 2 and "at guidance 1:" in lines[0] and "at guidance 4:" in lines[1]
    oracle.main(["score", "--stack", "s", "--decoder", "d"])
    assert drawn_at[-1] is None and "at guidance" not in capsys.readouterr().out


def test_oracle_stages_draw_each_row_from_its_own_conditioning(tmp_path, monkeypatch, capsys):
    """`stages` on a tiny stack: the first row decodes the CLIP image embeddings of the real scenes, the
    second samples the prior from their captions (no embeddings), the third gives the oracle decoder the
    no-layout oracle vectors; every row is drawn with the same guidance and sampler, reads back the same
    captions, and the table has a line for each."""
    import numpy as np
    import torch

    from benchmarks import oracle_embeddings as oracle
    from tests.stack_helpers import write_stack

    paths = write_stack(tmp_path / "runs")
    seen, asked = [], []
    # the tiny stack's CLIP is 16 wide, too narrow for a whole oracle vector: its shape one-hot stands in
    shapes = list(oracle.SHAPES)

    def narrow(scene, width, layout):
        asked.append(layout)
        return np.eye(width, dtype=np.float32)[shapes.index(scene["objects"][0]["shape"])]

    monkeypatch.setattr(oracle, "oracle_vector", narrow)
    real_score = oracle.score_decoder
    monkeypatch.setattr(
        oracle, "score_decoder", lambda p, s, e, g, how: seen.append((p, s, e, g, how)) or real_score(p, s, e, g, how)
    )
    oracle.main(
        ["stages", "--stack", str(tmp_path / "runs"), "--preset", "moved", "--scenes", "3"]
        + ["--guidance", "1.5", "--oracle-decoder", str(paths["decoder"]), "--sampler", "ddpm", "--steps", "3"]
    )
    (pipe, samples, clip_embeds, *_), (_, _, none, *_), (_, _, vectors, *_) = seen
    assert [g for *_, g, _ in seen] == [1.5] * 3 and none is None
    assert all(how == {"decoder_sampler": "ddpm", "decoder_steps": "3"} for *_, how in seen)  # every row alike
    expected = torch.cat([pipe.embed_image(image) for image, _ in samples])
    assert torch.allclose(clip_embeds, expected) and not torch.allclose(clip_embeds[0], clip_embeds[1])
    assert asked == [False] * 3  # the oracle row is the no-layout one, as a caption leaves the layout open
    assert [shapes[i] for i in vectors.argmax(1)] == [scene.objects[0].shape for _, scene in samples]
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| the")]
    assert len(rows) == 3 and all(line.count("%") >= 3 for line in rows)


def test_oracle_embeddings_state_each_scene_row_for_row(tmp_path):
    """benchmarks.oracle_embeddings on a few synthetic scenes: each row names its own scene's shape, colors,
    centre and turn, in the rows, captions and text embeddings of the folder it copies; two-object scenes
    are refused."""
    import numpy as np

    from benchmarks.oracle_embeddings import ORACLE_LAYOUT, oracle_vector, shard_records, write
    from data.embeddings import EmbeddingStore
    from data.scenes import PALETTE, SHAPES
    from data.synthetic import main as synthetic

    synthetic(["--out", str(tmp_path / "shards"), "--preset", "varied", "--num-samples", "12", "--resolution", "32"])
    records = shard_records(str(tmp_path / "shards"))
    keys = sorted(records)[::-1]  # another row order than the shards', as data.embed may write
    like = _embedding_folder(tmp_path / "like", [records[k]["caption"] for k in keys], np.ones((12, 40)), keys)
    like_keys = EmbeddingStore(like).load_part("00000")["key"]
    assert list(like_keys) == keys
    assert write(str(tmp_path / "shards"), like, str(tmp_path / "oracle")) == 12
    part = EmbeddingStore(str(tmp_path / "oracle")).load_part("00000")
    assert list(part["key"]) == list(like_keys) and part["img_emb"].shape == (12, 40)
    assert (part["text_emb"] == 1).all()
    for key, row, caption in zip(part["key"], part["img_emb"], part["caption"]):
        obj = records[key]["objects"][0]
        assert caption == records[key]["caption"]
        assert SHAPES[row[: len(SHAPES)].argmax()] == obj["shape"]
        assert list(PALETTE)[row[ORACLE_LAYOUT["color"] :][: len(PALETTE)].argmax()] == obj["color"]
        assert list(PALETTE)[row[ORACLE_LAYOUT["background"] :][: len(PALETTE)].argmax()] == records[key]["background"]
    x_slot = ORACLE_LAYOUT["background"] + len(PALETTE) + 1
    assert {round(float(v), 3) for v in part["img_emb"][:, x_slot]} != {0.0}  # the varied preset moves shapes
    no_layout = oracle_vector(records[keys[0]], 40, layout=False)
    assert (no_layout[x_slot : x_slot + 4] == 0).all() and (
        no_layout[: x_slot - 1] == part["img_emb"][0, : x_slot - 1]
    ).all()
    with pytest.raises(ValueError, match="one-object"):
        oracle_vector({"background": "red", "objects": [{}, {}]})
    with pytest.raises(ValueError, match="dimensions"):
        oracle_vector(records[keys[0]], width=16)
    with pytest.raises(ValueError, match="exists"):
        write(str(tmp_path / "shards"), like, str(tmp_path / "oracle"))


def test_cpu_attention_times_both_kernels_and_restores_the_choice(capsys):
    """benchmarks.cpu_attention: a row per shape and pass naming what unclip.layers.attention takes, then
    the demo decoder's step both ways, with the module's threshold put back afterwards."""
    from benchmarks import cpu_attention
    from unclip import layers

    limit = layers.CPU_MATH_ATTENTION_MAX_KEYS
    cpu_attention.main(["--repeats", "1", "--rounds", "1", "--batch", "2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2 * len(cpu_attention.SHAPES)
    takes = {(row.split(" | ")[0], row.split(" | ")[1]): row.split(" | ")[-1] for row in rows}
    assert takes[("| 32, 2, 64, 92, 32", "forward + backward")] == "math |"
    assert takes[("| 32, 2, 64, 92, 32", "forward")] == "default (flash) |"
    assert takes[("| 8, 4, 256, 280, 64", "forward + backward")] == "default (flash) |"
    assert "as chosen:" in out and "flash throughout:" in out and "speed-up of the choice" in out
    assert limit == layers.CPU_MATH_ATTENTION_MAX_KEYS


def _sheet(folder, color, size=(100, 30)):
    from PIL import Image

    folder.mkdir(parents=True)
    Image.new("RGB", size, color).save(folder / "sheet.png")


def test_demo_pictures_place_each_sheet_where_the_readme_says(tmp_path):
    """The README's moved pictures come from the sheets they name: the candidates in caption order, the
    inverted variations above fresh noise's; a missing or doubled folder is an error, not another picture."""
    from PIL import Image

    from benchmarks.demo_pictures import CANDIDATE_CAPTIONS, main
    from unclip.sample import short_hash, slug

    samples = tmp_path / "samples"
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for i, (caption, color) in enumerate(zip(CANDIDATE_CAPTIONS, colors)):
        _sheet(samples / "text" / f"{i:05d}-{slug(caption)}-{short_hash(caption)}", color)
    _sheet(samples / "text" / f"00009-{slug('a red star')}-{short_hash('a red star')}", (0, 0, 0))
    _sheet(samples / "interpolate-from-to-abc123", (0, 255, 255), size=(500, 100))
    _sheet(samples / "variations-scene-abc123", (255, 0, 255))
    _sheet(samples / "fresh-noise" / "variations-scene-abc123", (0, 128, 0))
    Image.new("RGB", (64, 64), (128, 128, 128)).save(samples / "scene.png")
    main([str(samples), "--out", str(tmp_path / "docs")])

    candidates = Image.open(tmp_path / "docs" / "moved_candidates.png")
    assert candidates.size == (560, 4 * 168)
    assert [candidates.getpixel((280, 84 + 168 * i)) for i in range(4)] == colors
    assert Image.open(tmp_path / "docs" / "moved_interpolation.png").getpixel((464, 104)) == (0, 255, 255)
    variations = Image.open(tmp_path / "docs" / "moved_variations.png")
    assert variations.getpixel((80, 88)) == variations.getpixel((80, 176 + 88)) == (128, 128, 128)
    assert variations.getpixel((400, 88)) == (255, 0, 255)
    assert variations.getpixel((400, 176 + 88)) == (0, 128, 0)

    _sheet(samples / "interpolate-from-to-def456", (0, 0, 0))
    with pytest.raises(FileNotFoundError, match="interpolate-from-to-abc123, interpolate-from-to-def456"):
        main([str(samples), "--out", str(tmp_path / "docs")])
