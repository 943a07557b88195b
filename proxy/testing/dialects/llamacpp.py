"""llama.cpp server's wire quirks: repeated tool-call names, `timings`, its Responses events."""

from __future__ import annotations

from proxy.testing.dialects.openai import Dialect
from proxy.testing.fake_answers import JSON, Choice, ToolCall


class LlamaCpp(Dialect):
    """llama.cpp's llama-server (tools/server/server-task.cpp, to_json_oaicompat_*).

    No `logprobs` key unless asked; usage only when `include_usage` asks
    (its own `choices: []` chunk) for chat, but always on the last chunk of
    a text completion; `timings` on the last chunk and in the whole object.
    Tool-call deltas repeat the call's id and name in every piece, as
    llama-server did before ggml-org/llama.cpp#13800 (issue #13774).
    """

    name = "llamacpp"

    def adjust(self, body: JSON) -> JSON:
        return {"parallel_tool_calls": False, **body}  # llama-server's default

    def head(self, meta: JSON, kind: str) -> JSON:
        base = {"id": meta["id"], "created": meta["created"], "model": meta["model"]}
        return {**base, "system_fingerprint": "b6097-fake", "object": kind}

    def chunk(self, head: JSON, part: JSON, include_usage: bool) -> JSON:
        return {"choices": [part], **head}

    def part(self, index: int, delta: JSON, logprobs: JSON | None = None) -> JSON:
        part = {"finish_reason": None, "index": index, "delta": delta}
        return {**part, "logprobs": logprobs} if logprobs is not None else part

    def role_delta(self, c: Choice) -> JSON:
        return {"role": "assistant", "content": None}

    def call_deltas(self, k: int, call: ToolCall) -> list[JSON]:
        return [
            {"tool_calls": [{"index": k, "id": call.id, "type": "function", "function": f}]}
            for f in ({"name": call.name, "arguments": piece} for piece in call.pieces)
        ]

    def finish_part(self, c: Choice) -> JSON:
        return {"finish_reason": c.finish, "index": c.index, "delta": {}}

    def whole_usage(self, usage: JSON) -> JSON:
        return {**usage, "prompt_tokens_details": {"cached_tokens": 0}}

    def end(self, chunks: list[JSON], head: JSON, usage: JSON, include: bool, kind: str) -> None:
        if kind == "text":  # a completion's last chunk carries usage, asked or not
            chunks[-1] = {**chunks[-1], "usage": self.whole_usage(usage)}
        elif include:
            chunks.append({"choices": [], **head, "usage": self.whole_usage(usage)})
        chunks[-1] = {**chunks[-1], "timings": _timings(usage)}

    def unasked_usage_chunks(self, chunks: list[JSON]) -> list[JSON]:
        # With include_usage, `timings` leave the last chunk for the usage chunk.
        return [{k: v for k, v in chunk.items() if k != "timings"} for chunk in chunks]

    def chat_object(self, meta: JSON, choices: list[Choice], usage: JSON) -> JSON:
        return {**super().chat_object(meta, choices, usage), "timings": _timings(usage)}

    def chat_choice(self, c: Choice) -> JSON:
        whole = {"finish_reason": c.finish, "index": c.index, "message": self.message(c)}
        if c.logprobs is not None:  # the key only appears when there are logprobs
            whole["logprobs"] = super().chat_choice(c)["logprobs"]
        return whole

    def message(self, c: Choice) -> JSON:
        message: JSON = {"role": "assistant", "content": None if c.calls else "".join(c.pieces)}
        if c.calls:
            message["tool_calls"] = [self.whole_call(k, call) for k, call in enumerate(c.calls)]
        return message

    def completion_object(self, meta: JSON, choices: list[Choice], usage: JSON) -> JSON:
        return {**super().completion_object(meta, choices, usage), "timings": _timings(usage)}

    def response_events(self, meta: JSON, item_id: str, plan: Choice, usage: JSON) -> list[JSON]:
        # No sequence_number, no output_index; created/in_progress carry a stub response.
        stub = {"id": meta["id"], "object": "response", "status": "in_progress"}
        item = {"content": [], "id": item_id, "role": "assistant", "status": "in_progress"}
        final = self.response_object(meta, item_id, plan, usage)
        text = "".join(plan.pieces)
        part = final["output"][0]["content"][0]
        return [
            {"type": "response.created", "response": stub},
            {"type": "response.in_progress", "response": stub},
            {"type": "response.output_item.added", "item": {**item, "type": "message"}},
            {
                "type": "response.content_part.added",
                "item_id": item_id,
                "part": {"type": "output_text", "text": ""},
            },
            *(
                {"type": "response.output_text.delta", "item_id": item_id, "delta": p}
                for p in plan.pieces
            ),
            {"type": "response.output_text.done", "item_id": item_id, "text": text},
            {"type": "response.content_part.done", "item_id": item_id, "part": part},
            {"type": "response.output_item.done", "item": final["output"][0]},
            {"type": "response.completed", "response": final},
        ]

    def response_object(self, meta: JSON, item_id: str, plan: Choice, usage: JSON) -> JSON:
        text = "".join(plan.pieces)
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
        item = {"type": "message", "status": "completed", "id": item_id, "role": "assistant"}
        used = {k: usage[k] for k in ("input_tokens", "output_tokens", "total_tokens")}
        return {
            "id": meta["id"],
            "object": "response",
            "created_at": meta["created_at"],
            "status": "completed",
            "model": meta["model"],
            "output": [{**item, "content": [part]}],
            "usage": {**used, "input_tokens_details": {"cached_tokens": 0}},
        }


def _timings(usage: JSON) -> JSON:
    prompt, predicted = usage["prompt_tokens"], usage["completion_tokens"]
    return {
        "prompt_n": prompt,
        "prompt_ms": prompt * 0.5,
        "prompt_per_token_ms": 0.5,
        "prompt_per_second": 2000.0,
        "predicted_n": predicted,
        "predicted_ms": predicted * 10.0,
        "predicted_per_token_ms": 10.0,
        "predicted_per_second": 100.0,
    }
