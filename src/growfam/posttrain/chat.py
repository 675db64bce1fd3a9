"""The chat format a post-trained member speaks.

growfam members come from pre-training without a chat template. They get the one below: each
turn is a role line (`<|user|>`, `<|assistant|>`, `<|system|>`) followed by the text and the
tokenizer's own end-of-sequence token, the layout of the Zephyr recipe (Tunstall et al. 2023,
"Zephyr: Direct Distillation of LM Alignment", arXiv 2310.16944) that SFT on UltraChat and DPO
on UltraFeedback come from. The role markers are plain text the tokenizer already encodes (a
few tokens each), and a reply ends with the EOS token the member already knows, so:

- no new token ids: the embedding and the output head keep their shape, every member of a
  family keeps one vocabulary (speculative decoding and the consistency KL need that), and no
  row starts from an untrained vector;
- generation stops at the EOS id without a multi-token stop string.

The assistant's text and its EOS lie between `{% generation %}` markers, which is what
`apply_chat_template(return_assistant_tokens_mask=True)`, and so TRL's assistant-only loss,
reads. A member that already has a chat template keeps it, if it marks the assistant's tokens.
"""

from __future__ import annotations

from ..errors import GrowfamError

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}"
    "{%- else %}{{- message['content'] + eos_token }}{%- endif %}"
    "{{- '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)


def with_chat_template(tokenizer, where: str):
    """`tokenizer` (a transformers tokenizer, changed in place and returned) with a chat template
    that marks the assistant's tokens: CHAT_TEMPLATE when it has none. GrowfamError when it has
    no EOS token, or a template of its own without `{% generation %}` markers. `where` names
    the member in messages."""
    if tokenizer.eos_token is None:
        raise GrowfamError(f"{where}: the tokenizer has no end-of-sequence token; a chat reply needs one to end")
    template = tokenizer.chat_template
    if template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    elif "generation" not in template:
        raise GrowfamError(f"{where}: its chat template does not mark the assistant's tokens with "
                           "{% generation %} ... {% endgeneration %}, which assistant-only loss needs; "
                           "remove chat_template from its tokenizer_config.json to use growfam's")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
