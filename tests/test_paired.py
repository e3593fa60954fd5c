"""Paired data: semantic augmentation, realistic pairs from inverted renders, the render baseline, sheets."""
import json

import numpy as np
import pytest
import torch

from likeness.backend.errors import UserError
from likeness.training.pairs import invert as inv
from likeness.training.pairs import paired_data as pd
from likeness.training.estimator.paired_set import PairedSet
from likeness.training.common.parts import PART_IDS

from test_invert import make_fake_dataset, tiny_generator, write_pack


@pytest.fixture(scope="module")
def gens():
    return tiny_generator(0), tiny_generator(5)          # "G_avatar", "G_real": same config, other weights


def test_augmentation_changes_only_the_chosen_parts_codes(gens):
    _, G = gens
    wp = inv.sample_wplus(G, 3, torch.Generator().manual_seed(4), 0.5, 0.5)
    lambdas = {"hair": 0.3, "background": 1.0, "eyeglasses": 0.06}
    aug = pd.semantic_augment(G, wp, lambdas, n_aug=4, keys=[10, 11, 12], seed=0)
    assert aug.shape == (3, 4, G.n_latent, G.cfg.w_dim)
    chosen = {G.shape_index(PART_IDS[p]) for p in lambdas} | {G.texture_index(PART_IDS[p]) for p in lambdas}
    assert len(chosen) == 6
    for idx in range(G.n_latent):
        same = torch.equal(aug[:, :, idx], wp[:, None, idx].expand(-1, 4, -1))
        assert same == (idx not in chosen), idx                         # bitwise kept / changed
    # the formula, with the same fresh codes n = G.map(z)
    n = pd.augmentation_codes(G, [10, 11, 12], 4, 3, seed=0)
    for j, (part, lam) in enumerate(lambdas.items()):
        for idx in (G.shape_index(PART_IDS[part]), G.texture_index(PART_IDS[part])):
            assert torch.allclose(aug[:, :, idx], (1 - lam) * wp[:, None, idx] + lam * n[:, :, j], atol=1e-6)
    assert torch.equal(aug[:, :, G.shape_index(PART_IDS["background"])], n[:, :, 1])   # λ = 1: the new code
    # copies differ from each other, and each sample's copies do not depend on its batch
    assert not torch.equal(aug[:, 0], aug[:, 1])
    alone = pd.semantic_augment(G, wp[1:2], lambdas, n_aug=4, keys=[11], seed=0)
    assert torch.allclose(alone, aug[1:2], atol=1e-6)
    with pytest.raises(UserError, match="unknown part 'tail'"):
        pd.get_config("tiny", aug_lambdas={"tail": 0.5})


def _setup(tmp_path, gens, n=5):
    G_av, _ = gens
    pack = write_pack(tmp_path)
    data = tmp_path / "renders"
    make_fake_dataset(data, pack, n=n, res=64, G=G_av)
    cfg = inv.get_config("tiny", chunk=8, batch=8, steps=3, perceptual="mse")
    w0 = G_av.mean_latents(n=200)["w_mean_transparent"]
    lat = inv.invert_dataset(G_av, None, data, tmp_path / "lat", cfg, w_init=w0, progress=False,
                             log=lambda *a: None)
    return pack, data, lat


def test_synthesized_pairs_are_a_readable_paired_set_and_resume(gens, tmp_path, monkeypatch):
    G_av, G_real = gens
    pack, data, lat_path = _setup(tmp_path, gens)
    cfg = pd.get_config("tiny", size=24, n_aug=3, chunk=2, batch=8, inspect=3, sheet_augs=2)
    out = pd.synthesize_pairs(G_real, lat_path, data, pack, tmp_path / "pairs", cfg, g_avatar=G_av,
                              progress=False, log=lambda *a: None)
    ps = PairedSet(out, pack)
    assert len(ps) == 5 * 4 and ps.images.shape == (20, 24, 24, 3)
    assert ps.groups.tolist() == [g for g in range(5) for _ in range(4)]
    for i in range(20):                                   # every row carries its source render's vector
        rec = json.loads((data / "vectors" / f"{ps.groups[i]:06d}.json").read_text())
        assert np.allclose(ps.continuous[i], rec["continuous"]) and ps.discrete[i].tolist() == rec["discrete"]
    # the first copy is G_real(w*) itself; the augmented ones differ from it
    lat = inv.load_latents(lat_path)
    with torch.no_grad():
        faces = pd.realistic_faces(G_real, lat["wp"][:2], [0, 1], cfg)
    assert np.array_equal(pd.to_uint8(faces[:, 0], 24), np.asarray(ps.images[[0, 4]]))
    assert not np.array_equal(ps.images[0], ps.images[1])
    tr, va = ps.split(0.4, 0)
    assert not set(ps.groups[tr]) & set(ps.groups[va])
    # inspection files: render | G_avatar(w*) | G_real(w*) | 2 augmentations, 3 rows
    insp = np.load(out / "inspect.npz")
    assert insp["recons"].shape == (3, 24, 24, 3) and insp["augs"].shape == (3, 2, 24, 24, 3)
    from PIL import Image
    sheet = np.asarray(Image.open(out / "contact_sheet.png"))
    assert sheet.shape == (3 * 26 + 2, 5 * 26 + 2, 3)
    assert not (out / ".chunks").exists()

    # interrupted after the first chunk, then resumed: the same set, the first chunk not redone
    calls = []
    real = pd.realistic_faces

    def counting(G, wp, keys, c):
        calls.append(list(keys))
        if len(calls) == 2 and not counting.resumed:
            raise KeyboardInterrupt
        return real(G, wp, keys, c)
    counting.resumed = False
    monkeypatch.setattr(pd, "realistic_faces", counting)
    with pytest.raises(KeyboardInterrupt):
        pd.synthesize_pairs(G_real, lat_path, data, pack, tmp_path / "pairs2", cfg, progress=False,
                            log=lambda *a: None)
    assert calls == [[0, 1], [2, 3]]
    counting.resumed = True
    calls.clear()
    out2 = pd.synthesize_pairs(G_real, lat_path, data, pack, tmp_path / "pairs2", cfg, progress=False,
                               log=lambda *a: None)
    assert [0, 1] not in calls and [2, 3] in calls and [4] in calls
    ps2 = PairedSet(out2, pack)
    assert np.array_equal(np.asarray(ps2.images), np.asarray(ps.images))
    # a finished set is not regenerated; other settings in a half-done folder are refused
    calls.clear()
    pd.synthesize_pairs(G_real, lat_path, data, pack, out2, cfg, progress=False, log=lambda *a: None)
    assert calls == []


def test_no_augmentation_ablation_keeps_one_face_per_render(gens, tmp_path):
    G_av, G_real = gens
    pack, data, lat_path = _setup(tmp_path, gens, n=3)
    cfg = pd.get_config("tiny", size=48, n_aug=0, inspect=2)
    out = pd.synthesize_pairs(G_real, lat_path, data, pack, tmp_path / "p", cfg, g_avatar=G_av, progress=False,
                              log=lambda *a: None)
    ps = PairedSet(out, pack)
    assert ps.images.shape == (3, 48, 48, 3) and ps.groups.tolist() == [0, 1, 2]
    assert ps.manifest["n_aug"] == 0 and (out / "contact_sheet.png").is_file()


def test_refuses_half_done_folder_with_other_settings(gens, tmp_path, monkeypatch):
    _, G_real = gens
    pack, data, lat_path = _setup(tmp_path, gens, n=3)
    cfg = pd.get_config("tiny", n_aug=1, chunk=1, batch=4, inspect=0)

    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pd, "write_paired_set", stop)
    with pytest.raises(KeyboardInterrupt):
        pd.synthesize_pairs(G_real, lat_path, data, pack, tmp_path / "p", cfg, progress=False, log=lambda *a: None)
    monkeypatch.undo()
    with pytest.raises(UserError, match="partial paired set"):
        pd.synthesize_pairs(G_real, lat_path, data, pack, tmp_path / "p", pd.get_config(cfg, n_aug=2),
                            progress=False, log=lambda *a: None)


def test_baseline_renders_keep_vectors_aligned(tmp_path):
    pack = write_pack(tmp_path)
    data = tmp_path / "renders"
    make_fake_dataset(data, pack, n=9, res=40, solid=True, skip=(2, 7))
    out = pd.renders_to_paired_set(data, pack, tmp_path / "base", size=16)
    ps = PairedSet(out, pack)
    assert ps.images.shape == (7, 16, 16, 3) and ps.groups.tolist() == [0, 1, 3, 4, 5, 6, 8]
    assert ps.manifest["kind"] == "renders"
    for i in range(7):                                    # the colour encodes the row's own vector
        img = np.asarray(ps.images[i]).astype(int)
        assert abs(img[..., 0].mean() - round(float(ps.continuous[i, 1]) * 255)) <= 1
        assert abs(img[..., 1].mean() - int(ps.discrete[i, 0]) * 100) <= 1
        rec = json.loads((data / "vectors" / f"{ps.groups[i]:06d}.json").read_text())
        assert np.allclose(ps.continuous[i], rec["continuous"])
    # a dataset rendered for another schema is refused
    man = json.loads((data / "manifest.json").read_text())
    man["schema"] = "0" * 16
    (data / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(UserError, match="render it again"):
        pd.renders_to_paired_set(data, pack, tmp_path / "base2", size=16)


def test_contact_sheet_layout():
    rng = np.random.default_rng(0)
    r = rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    augs = rng.integers(0, 255, (2, 3, 8, 8, 3), dtype=np.uint8)
    sheet = pd.contact_sheet(r, r, r, augs)
    assert sheet.shape == (2 * 10 + 2, 6 * 10 + 2, 3)
    assert np.array_equal(sheet[2:10, 2:10], r[0]) and np.array_equal(sheet[12:20, 52:60], augs[1, 2])
    assert pd.contact_sheet(r, None, r, augs).shape[1] == 5 * 10 + 2
