"""litefpn_kernels.patch on a stand-in of the client's eager LiteFPN (tests/support/
client_litefpn.py): the patched model against an unpatched copy, step by step, in train and eval
(outputs in the client's format, input and parameter gradients, BatchNorm running statistics),
state_dict round trips, revert, and the key mapping into a plain LiteFPN."""
import copy
import itertools
import warnings

import pytest
import torch

from litefpn_kernels import LiteFPN
from litefpn_kernels.patch import (CLIENT_KEY_PREFIXES, PatchedLiteFPN, apply_litefpn_kernels,
                                   client_state_dict_to_litefpn, litefpn_state_dict_to_client)
from tests.support import client_litefpn as client
from tests.support.helpers import need, randomise
from tests.support.inputs import make_feats

SMALL = dict(in_channels=[8, 12, 16, 24], fpn_channels=16)
TOL64 = dict(rtol=1e-9, atol=1e-9)
TOP = (2, 3)  # B4's size: float64 convolutions are slow on CPU
FUSIONS = ("add", "weighted", "attention")


def client_model(fusion_type, return_pyramid, seed=0):
    torch.manual_seed(seed)
    m = client.Model(**SMALL, fusion_type=fusion_type, return_pyramid=return_pyramid)
    randomise(m, seed)
    return m.double()


def flat(out):
    """The client's outputs (head, hf | (hf, [p3_td, p4_td, p5])) as a list of tensors."""
    head, neck = out
    if isinstance(neck, tuple):
        hf, pyramid = neck
        assert isinstance(pyramid, list) and len(pyramid) == 3
        return [head, hf, *pyramid]
    assert isinstance(neck, torch.Tensor)
    return [head, neck]


def run_steps(model, training, n_steps=2):
    """n_steps of forward (+ backward and an SGD step in training) on fresh inputs; -> per step
    the outputs and input gradients. The optimizer is built here, i.e. for a patched model after
    patching; `patched_optimizer_steps` covers one built before."""
    model.train(training)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    results = []
    for step in range(n_steps):
        feats = make_feats(top=TOP, in_channels=SMALL["in_channels"], dtype=torch.float64, seed=step,
                           requires_grad=training)
        with torch.set_grad_enabled(training):
            outs = flat(model(feats))
        got = [o.detach().clone() for o in outs]
        if training:
            opt.zero_grad()
            sum((o * (k + 1)).square().mean() for k, o in enumerate(outs)).backward()
            got += [f.grad.clone() for f in feats]
            opt.step()
        results.append(got)
    return results


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("fusion_type,return_pyramid", list(itertools.product(FUSIONS, (False, True))))
def test_patched_model_matches_client(fusion_type, return_pyramid, backend):
    need("lateral_up2_fuse", backend, "cpu")
    ref = client_model(fusion_type, return_pyramid)
    model = copy.deepcopy(ref)
    original_neck = model.neck
    handle = apply_litefpn_kernels(model, backend=backend)
    assert handle.patched == ["neck"] and handle.skipped == []
    assert isinstance(model.neck, PatchedLiteFPN) and model.neck.backend == backend

    for training in (True, False, True):
        got, want = run_steps(model, training), run_steps(ref, training)
        for g_step, w_step in zip(got, want):
            assert len(g_step) == len(w_step)
            for g, w in zip(g_step, w_step):
                torch.testing.assert_close(g, w, **TOL64)
        # weights after SGD (i.e. the gradients), BN running stats and num_batches_tracked,
        # under the client's keys
        sd_got, sd_want = model.state_dict(), ref.state_dict()
        assert list(sd_got) == list(sd_want)
        for k in sd_want:
            torch.testing.assert_close(sd_got[k], sd_want[k], **TOL64, msg=lambda m: f"{k}: {m}")
    # the client's own neck object holds the very same tensors
    for k, t in original_neck.state_dict().items():
        assert t is model.neck.state_dict()[k] or torch.equal(t, model.neck.state_dict()[k])


def test_optimizer_built_before_patching_trains_the_patched_neck():
    ref = client_model("weighted", False)
    model = copy.deepcopy(ref)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    apply_litefpn_kernels(model, backend="eager")
    for m, o in ((ref, opt_ref), (model, opt)):
        m.train()
        for step in range(2):
            o.zero_grad()
            flat(m(make_feats(top=TOP, in_channels=SMALL["in_channels"], dtype=torch.float64,
                              seed=step)))[1].square().mean().backward()
            o.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, **TOL64)
    # the step moved the weights (else the comparison above proves nothing)
    assert not torch.equal(ref.neck.fuse_1_4.weight_a, client_model("weighted", False).neck.fuse_1_4.weight_a)


@pytest.mark.parametrize("fusion_type", FUSIONS)
def test_state_dict_round_trip(fusion_type):
    ref = client_model(fusion_type, True)
    model = copy.deepcopy(ref)
    apply_litefpn_kernels(model, backend="eager")
    saved = model.state_dict()
    assert list(saved) == list(ref.state_dict())
    # into a fresh (differently initialised) client model, and back into the patched one
    fresh = client_model(fusion_type, True, seed=1)
    fresh.load_state_dict(saved)
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    other = client_model(fusion_type, True, seed=2)
    patched_other = copy.deepcopy(other)
    apply_litefpn_kernels(patched_other, backend="eager")
    patched_other.load_state_dict(ref.state_dict())  # strict: every client key is taken
    for k, v in ref.state_dict().items():
        assert torch.equal(patched_other.state_dict()[k], v), k
    # the plain LiteFPN keys load too
    patched_other.neck.load_state_dict(client_state_dict_to_litefpn(fresh.neck.state_dict()))


def test_revert_restores_the_original_modules_with_trained_weights():
    ref = client_model("attention", True)
    model = copy.deepcopy(ref)
    original = model.neck
    handle = apply_litefpn_kernels(model, backend="eager")
    run_steps(model, True, n_steps=2)
    run_steps(ref, True, n_steps=2)
    model.eval()
    assert handle.revert() is model
    assert model.neck is original and type(model.neck) is client.LiteFPN
    assert not model.neck.training  # the mode set while patched carries over
    assert handle.revert() is model  # a second revert does nothing
    ref.eval()
    feats = make_feats(top=TOP, in_channels=SMALL["in_channels"], dtype=torch.float64, seed=9)
    with torch.no_grad():
        for g, w in zip(flat(model(feats)), flat(ref(feats))):
            torch.testing.assert_close(g, w, **TOL64)


def test_patching_the_neck_itself_and_rng_untouched():
    neck = client_model("weighted", False).neck
    torch.manual_seed(123)
    state = torch.get_rng_state()
    handle = apply_litefpn_kernels(neck, backend="eager")
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(handle.model, PatchedLiteFPN) and handle.patched == [""]
    with handle:
        pass
    assert handle.model is neck


def test_incompatible_neck_is_left_alone_with_a_reason():
    model = client_model("add", False)
    model.neck.fuse_1_8.smooth.act = torch.nn.ReLU()
    with pytest.warns(UserWarning, match="fuse_1_8.smooth.act is ReLU"):
        handle = apply_litefpn_kernels(model)
    assert handle.patched == [] and handle.skipped[0][0] == "neck"
    assert type(model.neck) is client.LiteFPN


def test_non_client_modules_are_not_touched():
    model = torch.nn.Sequential(LiteFPN(**dict(in_channels=(8, 12, 16, 24), channels=16)),
                                torch.nn.Conv2d(3, 3, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = apply_litefpn_kernels(model)
    assert handle.patched == [] and handle.skipped == []


@pytest.mark.parametrize("fusion_type", FUSIONS)
def test_key_mapping_loads_a_client_checkpoint_into_litefpn(fusion_type):
    ref = client_model(fusion_type, True).eval()
    ckpt = ref.state_dict()  # whole-model checkpoint: the neck under "neck."
    fuse, gate = {"add": ("add", None), "weighted": ("weighted", None),
                  "attention": ("add", "se")}[fusion_type]
    neck = LiteFPN(in_channels=SMALL["in_channels"], channels=16, fuse=fuse, gate=gate,
                   backend="eager").double().eval()
    neck.load_state_dict(client_state_dict_to_litefpn(ckpt, prefix="neck."))  # strict
    feats = make_feats(top=TOP, in_channels=SMALL["in_channels"], dtype=torch.float64)
    with torch.no_grad():
        hf, pyramid = ref.neck(feats)
        out = neck(feats)
    for g, w in zip((out.hf, out.p3_td, out.p4_td, out.p5), (hf, *pyramid)):
        torch.testing.assert_close(g, w, **TOL64)
    back = litefpn_state_dict_to_client(neck.state_dict(), prefix="neck.")
    assert set(back) == {k for k in ckpt if k.startswith("neck.")}
    with pytest.raises(KeyError, match="head.weight"):
        client_state_dict_to_litefpn({"head.weight": ckpt["head.weight"]})
    assert len({dst for _, dst in CLIENT_KEY_PREFIXES}) == len(CLIENT_KEY_PREFIXES)
