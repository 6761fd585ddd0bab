"""Preference batches whose pairs share prompts, and their separate-forward log-probs: what the GPU check
compares the fast layouts against (the same corner cases as the tests: answers that start alike, a chosen
row that is a prefix of its rejected row, a pair with nothing in common, rows of different widths)."""
from __future__ import annotations

import torch

EOS = 2


def padded_pairs(rows: dict[str, list[tuple[list, list]]], pads: dict[str, int], extra: int = 1) -> dict:
    """{side: [(prompt, answer) token lists]} -> right-padded ``<side>_input_ids``, ``_attention_mask`` and
    ``_labels`` (-100 on the prompt and the padding), each side padded with its own id to its longest row
    plus `extra` columns."""
    out = {}
    for side, seqs in rows.items():
        T = max(len(p) + len(a) for p, a in seqs) + extra
        ids = torch.full((len(seqs), T), pads[side], dtype=torch.long)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for b, (p, a) in enumerate(seqs):
            row = torch.tensor(p + a)
            ids[b, :len(row)], mask[b, :len(row)] = row, 1
            labels[b, len(p):len(row)] = row[len(p):]
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return out


def shared_prompt_batch(vocab: int = 320, seed: int = 7, pad_c: int = 0, pad_r: int = 0) -> dict:
    """Six pairs, right-padded (chosen rows with `pad_c`, rejected with `pad_r`): chosen/rejected input_ids,
    attention_mask and labels (-100 on the prompt)."""
    g = torch.Generator().manual_seed(seed)

    def toks(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    pairs = []
    for prompt_len, c_len, r_len, common in ((6, 5, 3, 0), (2, 4, 7, 2), (9, 1, 1, 0), (4, 3, 6, 3)):
        prompt, answer = toks(prompt_len), toks(common)
        pairs.append((prompt, answer + toks(c_len - common) + [EOS], answer + toks(r_len - common) + [EOS]))
    prompt = toks(5)
    chosen = toks(2)
    pairs.append((prompt, chosen, chosen + toks(3) + [EOS]))  # chosen is a prefix of rejected
    pairs.append((toks(3), toks(4) + [EOS], toks(2) + [EOS]))
    rejected = [(p, r) for p, _, r in pairs]
    rejected[-1] = (toks(4), rejected[-1][1])  # the last pair's rejected row: another prompt altogether
    return padded_pairs({"chosen": [(p, c) for p, c, _ in pairs], "rejected": rejected},
                        {"chosen": pad_c, "rejected": pad_r})


def separate_logps(model, batch: dict) -> dict:
    """Each side through the model on its own, full logits in the model's dtype: the independent reference."""
    out = {}
    for side in ("chosen", "rejected"):
        ids, mask, labels = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logp = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
        target = labels[:, 1:]
        token = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out[f"{side}_logps"] = (token * (target != -100)).sum(-1)
    return out
