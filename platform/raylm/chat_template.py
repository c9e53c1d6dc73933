"""The chat template an exported causal LM carries (`chat_template.jinja`, read by transformers' tokenizers, vLLM
and raylm's `/v1/chat/completions`).

`model.chat_template` wins; else a tokenizer that already has one (a pretrained model's) keeps it; else a causal LM
gets DEFAULT_CHAT_TEMPLATE: role-tagged turns, each closed by the end-of-text token the model learned to stop at.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.43 saves and loads a tokenizer's template here

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def has_chat_template(tokenizer_dir: str | Path) -> bool:
    """A template in the tokenizer files: its own file, or (older saves) inside tokenizer_config.json."""
    import json

    d = Path(tokenizer_dir)
    config = d / "tokenizer_config.json"
    return (d / TEMPLATE_FILE).is_file() or (config.is_file() and bool(json.loads(config.read_text()).get("chat_template")))


def write_chat_template(model_dir: str | Path, task: str, template: str | None) -> str | None:
    """Give `model_dir`'s tokenizer its chat template (see module doc); returns what was written, or None."""
    if task != "causal_lm" and template is None:
        return None
    if template is None and has_chat_template(model_dir):
        return None
    text = template or DEFAULT_CHAT_TEMPLATE
    (Path(model_dir) / TEMPLATE_FILE).write_text(text)
    return text
