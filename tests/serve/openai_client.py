"""The official `openai` Python client against `kvc serve`: one chat completion whole and
one streamed, greedy. Prints one JSON object with both texts and the usage counts.

Usage: python3 openai_client.py BASE_URL MODEL PROMPT MAX_TOKENS
"""
import json
import sys

import openai

base_url, model, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
messages = [{"role": "user", "content": prompt}]
whole = client.chat.completions.create(
    model=model, messages=messages, max_tokens=max_tokens, temperature=0
)
pieces = []
finish = None
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
):
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        finish = choice.finish_reason or finish
print(json.dumps({
    "whole": whole.choices[0].message.content,
    "whole_finish": whole.choices[0].finish_reason,
    "usage": [whole.usage.prompt_tokens, whole.usage.completion_tokens],
    "streamed": "".join(pieces),
    "streamed_finish": finish,
}))
