"""Model cards: the run's real settings and numbers on the card, and the hub upload's one-line error."""
from __future__ import annotations

import pytest

from dpo_accel.outputs import model_card
from dpo_accel.config.load import load_recipe

TABLE = "| held-out measure (4 generations) | before | after |\n| --- | ---: | ---: |\n| format_rate | 0.250 | 0.750 |"
SUMMARY = {"global_step": 7, "pairs_seen": 56, "tokens_seen": 12345.0, "table": TABLE,
           "data": {"train": {"pairs": 24, "kept": 23, "truncated": 1, "dropped": 1},
                    "eval": {"pairs": 8, "kept": 8, "truncated": 0, "dropped": 0}}}


def test_cards_name_base_objective_data_lora_steps_table_versions(tmp_path):
    recipe = load_recipe(None, ["model.model_name_or_path=smollm2-135m-instruct", "lora.use_peft=true",
                                "lora.lora_r=8", "loss.loss_type=[sigmoid, bco_pair]", "loss.loss_weights=[0.8, 0.2]",
                                "loss.beta=0.25", "loss.rpo_alpha=1.0", "train.learning_rate=2e-4"])
    adapter = model_card.write_model_card(str(tmp_path), "adapter", recipe, SUMMARY)
    text = open(adapter).read()
    assert text.startswith("---\nlibrary_name: peft\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    for expected in ("0.8 x `sigmoid` + 0.2 x `bco_pair`", "- `beta`: 0.25", "- `label_smoothing`: 0.0",
                     "`rpo_alpha`: 1.0", "- Source: `data/arith_prefs`",
                     "- `train`: 24 rows read, 23 kept (1 truncated, 1 dropped)", "- Optimizer steps: 7",
                     "- Pairs seen: 56", "- Tokens seen: 12345", "- `learning_rate`: 0.0002",
                     "`lora_r`: 8, `lora_alpha`: 32", TABLE, "PeftModel.from_pretrained(base, ",
                     'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")', "- torch 2.",
                     "- transformers ", "- peft "):
        assert expected in text, expected
    merged = model_card.model_card("model", recipe, SUMMARY, "me/merged")
    assert "library_name: transformers" in merged and 'AutoModelForCausalLM.from_pretrained("me/merged")' in merged
    assert "merged model (LoRA adapter folded into the base)" in merged

    local = load_recipe(None, [f"model.model_name_or_path={tmp_path}"])  # a local folder: no hub base_model
    card = model_card.model_card("model", local, {"global_step": 1}, str(tmp_path / "model"))
    assert "base_model:" not in card and "Full fine-tuning (no LoRA)" in card and "Held-out" not in card


class FakeApi:
    calls: list = []
    fail = False

    def create_repo(self, repo_id, exist_ok):
        if self.fail:
            raise ConnectionError("[Errno -2] Name or service not known\nsecond line")
        self.calls.append(("create", repo_id))

    def upload_folder(self, folder_path, repo_id, commit_message):
        self.calls.append(("upload", folder_path, repo_id))


def test_push_to_hub_uploads_merged_model_or_fails_in_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    exported = {"adapter": str(tmp_path / "adapter"), "model": str(tmp_path / "model")}
    assert model_card.push_to_hub(exported, "me/run") == str(tmp_path / "model")
    assert FakeApi.calls == [("create", "me/run"), ("upload", str(tmp_path / "model"), "me/run")]
    assert model_card.push_to_hub({"adapter": str(tmp_path / "adapter")}, "me/run") == str(tmp_path / "adapter")
    monkeypatch.setattr(FakeApi, "fail", True)
    with pytest.raises(model_card.PushError) as e:
        model_card.push_to_hub(exported, "me/run")
    assert str(e.value) == (f"train.push_to_hub: uploading '{tmp_path / 'model'}' to 'me/run' failed (ConnectionError: "
                            "[Errno -2] Name or service not known); the local export is complete")
