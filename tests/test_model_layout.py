"""ORCNN's eval mode on the CPU: channels-last weights, same outputs, trainable afterwards."""

import torch

from orcnn_core.model import build_model
from tiny_models import tiny_model


def image():
    return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))


def target():
    amodal = torch.zeros(1, 64, 64, dtype=torch.uint8)
    amodal[0, 10:40, 12:44] = 1
    return {"boxes": torch.tensor([[12.0, 10.0, 44.0, 40.0]]), "labels": torch.tensor([1]),
            "amodal_masks": amodal, "visible_masks": amodal.clone()}


def conv_weights(model):
    return [p for p in model.parameters() if p.dim() == 4]


def test_eval_switches_conv_weights_to_channels_last_and_train_back():
    model = tiny_model(box_score_thresh=0.0)
    weights = conv_weights(model)
    assert weights and all(p.is_contiguous() for p in weights)
    assert model.eval() is model
    # The same Parameter objects (optimisers keep theirs), now channels-last.
    assert all(a is b for a, b in zip(weights, conv_weights(model)))
    assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in weights if p.shape[-1] > 1)
    model.train()
    assert all(p.is_contiguous() for p in conv_weights(model))


def test_channels_last_outputs_equal_contiguous_outputs():
    model = tiny_model(box_score_thresh=0.0).eval()
    with torch.inference_mode():
        fast = model([image()])[0]
    # The same model in eval mode with torchvision's contiguous layout as the reference.
    model.to(memory_format=torch.contiguous_format)
    assert all(p.is_contiguous() for p in conv_weights(model))
    with torch.inference_mode():
        reference = model([image()])[0]
    assert len(reference["boxes"]) == 5
    assert torch.equal(fast["labels"], reference["labels"])
    for key in ("boxes", "scores", "amodal_mask_logits", "visible_mask_logits"):
        torch.testing.assert_close(fast[key], reference[key], rtol=1e-4, atol=1e-4)


def test_eval_under_inference_mode_leaves_the_model_trainable():
    model = tiny_model(box_score_thresh=0.0)
    with torch.inference_mode():
        model.eval()
        model([image()])
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    losses = model([image()], [target()])
    sum(losses.values()).backward()  # fails on inference tensors
    assert all(p.grad is not None for p in conv_weights(model) if p.requires_grad)


def test_state_dict_of_eval_model_loads_into_training_model():
    source = tiny_model(box_score_thresh=0.0).eval()
    model = build_model(source.config)
    model.load_state_dict(source.state_dict())
    model.eval()
    with torch.inference_mode():
        a, b = source([image()])[0], model([image()])[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
