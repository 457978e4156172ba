"""Final-logit softcapping (Gemma-2): every LM-head path of the HMT forward applies it, so they agree."""

import peft
import torch

from hmt_adapter import HMTConfig
from hmt_adapter.testing import tiny_causal_lm

SEG = 8


def gemma_hmt():
    base = tiny_causal_lm("gemma2", num_hidden_layers=1)
    assert base.config.final_logit_softcapping == 0.5
    return peft.get_peft_model(base, HMTConfig(segment_length=SEG, num_sensory=2, recall_dim=8)).eval()


def test_every_loss_path_applies_the_softcap():
    model = gemma_hmt()
    ids = torch.randint(4, 128, (2, 3 * SEG + 3))
    with torch.no_grad():
        full = model(input_ids=ids, labels=ids)  # loss from the kept (capped) logits
        assert full.logits.abs().max() <= 0.5 + 1e-6  # the logits handed back are capped
        by_hand = torch.nn.functional.cross_entropy(full.logits[:, :-1].reshape(-1, full.logits.shape[-1]),
                                                    ids[:, 1:].reshape(-1))
        torch.testing.assert_close(full.loss, by_hand, atol=1e-5, rtol=1e-5)
        last = model(input_ids=ids, labels=ids, logits_to_keep=1)  # loss from the chunked log-prob kernel
        torch.testing.assert_close(last.loss, full.loss, atol=1e-5, rtol=1e-5)
        fused = model(input_ids=ids, labels=ids, fused_lm_head=True)  # TRL's fused head
        mask = fused.label_mask.bool()
        torch.testing.assert_close(-fused.log_probs[mask].mean(), full.loss, atol=1e-5, rtol=1e-5)
