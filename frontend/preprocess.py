"""OpenAI request -> the worker requests of its choices: chat template (with tools),
tokenization, and every check that needs the model (context length, token ids in the
vocabulary) or OpenAI's own rules. Each declared request field is honoured here or refused with
a 400 that names it; nothing is dropped."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from dynamo import errors
from dynamo.wire import ModelCard, OutputConstraint, PreprocessedRequest, SamplingOptions, StopConditions
from frontend.parsers import REASONING_PARSERS, TOOL_CALL_PARSERS
from frontend.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    ResponseFormat,
    SamplingFields,
    Tool,
)
from frontend.tokenizer import ModelTokenizer

ToolMode = Literal["none", "parse", "named", "required"]


@dataclass(frozen=True, slots=True)
class ToolSpecs:
    """How tool calls come out of one request's text. `parse`: the model's own format, read by
    `parser` (tool_choice auto); `named`: the whole output is the arguments of tool `name`
    (grammar-constrained); `required`: the output is a JSON list of {"name", "parameters"}
    (grammar-constrained); `none`: no tool calls."""

    mode: ToolMode = "none"
    parser: str | None = None
    name: str | None = None
    parallel: bool = True
    # name -> parameters JSON schema, of the request's tools
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """What the response side does with every choice of one request."""

    stop_strings: tuple[str, ...]
    # Ids that end generation (EOS unless ignore_eos, plus stop_token_ids); their text is not
    # part of the output.
    stop_token_ids: frozenset[int]
    max_tokens: int
    logprobs: bool = False
    top_logprobs: int = 0
    tools: ToolSpecs = ToolSpecs()
    reasoning_parser: str | None = None
    legacy_logprobs: bool = False  # completions' parallel-list logprobs shape


@dataclass(frozen=True, slots=True)
class ChoiceSpec:
    """One choice: the request its worker gets, and the prompt it belongs to."""

    index: int
    request: PreprocessedRequest
    prompt_index: int = 0
    echo_text: str = ""


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request ready to route: its choices (n per prompt, in OpenAI's index order)."""

    request_id: str
    model: str
    choices: list[ChoiceSpec]
    output: OutputSpec
    stream: bool
    include_usage: bool
    prompt_tokens: int  # over the distinct prompts (n choices of one prompt count it once)

    @property
    def request(self) -> PreprocessedRequest:
        """The first choice's request (the only one for n=1 and one prompt)."""
        return self.choices[0].request


@dataclass(frozen=True, slots=True)
class ParserNames:
    """The tool-call and reasoning parsers configured for a model (None: from its template)."""

    tool_call: str | None = None
    reasoning: str | None = None


def preprocess_chat(
    body: ChatCompletionRequest,
    card: ModelCard,
    tokenizer: ModelTokenizer,
    request_id: str,
    parsers: ParserNames = ParserNames(),
) -> Prepared:
    _refuse_chat_only_fields(body)
    if body.top_logprobs is not None and body.top_logprobs > 0 and not body.logprobs:
        raise errors.InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    tools = _tool_specs(body, tokenizer, parsers)
    template_kwargs = dict(body.chat_template_kwargs or {})
    reasoning = reasoning_parser_for(tokenizer, parsers, template_kwargs)
    tool_dicts = None
    if body.tools and tools.mode != "none":
        tool_dicts = [{"type": "function", "function": function_dict(t)} for t in body.tools]
    prompt = tokenizer.render_chat(body.messages, tools=tool_dicts, template_kwargs=template_kwargs)
    # The template already spells BOS and other special tokens as text.
    token_ids = tokenizer.encode(prompt, add_special_tokens=False)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    constraint = _constraint(body, body.response_format, tools)
    return _prepare(
        body, card, tokenizer, request_id, [token_ids], max_tokens, param, "messages",
        logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0, constraint=constraint,
        tools=tools, reasoning=reasoning,
    )


def preprocess_completion(
    body: CompletionRequest, card: ModelCard, tokenizer: ModelTokenizer, request_id: str
) -> Prepared:
    if body.suffix:
        raise errors.InvalidRequest("suffix is not supported: no served model is trained for fill-in-the-middle", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise errors.InvalidRequest(
            f"best_of={body.best_of} is not supported; only best_of equal to n (every sequence is returned)",
            param="best_of",
        )
    prompts: list[list[int]] = []
    texts: list[str | None] = []
    raw = body.prompt
    items: list[str | int | list[int]]
    if isinstance(raw, str):
        items = [raw]
    elif all(isinstance(p, int) for p in raw):
        items = [[p for p in raw if isinstance(p, int)]]  # one prompt given as token ids
    else:
        items = list(raw)
    for i, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            prompts.append(tokenizer.encode(item, add_special_tokens=True))
            texts.append(item)
        elif isinstance(item, list):
            _check_vocab(item, tokenizer, param)
            prompts.append(list(item))
            texts.append(None)
        else:
            raise errors.InvalidRequest(
                "prompt must be a string, a list of token ids, or a list of strings or of token-id lists",
                param=param,
            )
    constraint = _constraint(body, body.response_format, ToolSpecs())
    logprobs = body.logprobs
    prepared = _prepare(
        body, card, tokenizer, request_id, prompts, body.max_tokens, "max_tokens", "prompt",
        logprobs=logprobs is not None, top_logprobs=logprobs or 0, constraint=constraint,
        prompt_logprobs=logprobs if body.echo and logprobs is not None else None,
        legacy_logprobs=True,
    )
    if not body.echo:
        return prepared
    echoes = [text if text is not None else tokenizer.decode(ids) for text, ids in zip(texts, prompts)]
    choices = [ChoiceSpec(c.index, c.request, c.prompt_index, echoes[c.prompt_index]) for c in prepared.choices]
    return Prepared(
        prepared.request_id, prepared.model, choices, prepared.output, prepared.stream,
        prepared.include_usage, prepared.prompt_tokens,
    )


# ----------------------------------------------------------------------------- refusals


def _refuse_chat_only_fields(body: ChatCompletionRequest) -> None:
    if body.functions is not None or body.function_call is not None:
        param = "functions" if body.functions is not None else "function_call"
        raise errors.InvalidRequest(f"{param} is deprecated and not supported; use tools and tool_choice", param=param)
    if body.modalities is not None and body.modalities != ["text"]:
        raise errors.InvalidRequest(f"modalities {body.modalities} are not supported; only [\"text\"]", param="modalities")
    for name in ("audio", "prediction", "web_search_options"):
        if getattr(body, name) is not None:
            raise errors.InvalidRequest(f"{name} is not supported by this server", param=name)
    if body.reasoning_effort is not None:
        raise errors.InvalidRequest(
            "reasoning_effort is not supported: served models have no reasoning budget; "
            "use chat_template_kwargs (e.g. {\"enable_thinking\": false}) where the template has one",
            param="reasoning_effort",
        )


def _refuse_common(body: SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        # As OpenAI and vLLM answer: there is no stream for the options to shape.
        raise errors.InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
    if body.store:
        raise errors.InvalidRequest("store=true is not supported: this server does not keep completions", param="store")
    if body.metadata is not None:
        raise errors.InvalidRequest("metadata is only kept with stored completions, which this server does not keep", param="metadata")
    if body.service_tier not in (None, "auto", "default"):
        raise errors.InvalidRequest(
            f"service_tier {body.service_tier!r} is not supported; this server has one tier (auto/default)",
            param="service_tier",
        )


# --------------------------------------------------------------------------------- tools


def function_dict(tool: Tool) -> dict[str, Any]:
    f = tool.function
    out: dict[str, Any] = {"name": f.name}
    if f.description is not None:
        out["description"] = f.description
    out["parameters"] = f.parameters if f.parameters is not None else {"type": "object", "properties": {}}
    return out


def _tool_specs(body: ChatCompletionRequest, tokenizer: ModelTokenizer, parsers: ParserNames) -> ToolSpecs:
    choice = body.tool_choice
    tools = body.tools or []
    if not tools:
        if choice not in (None, "none", "auto"):
            raise errors.InvalidRequest("tool_choice needs tools", param="tool_choice")
        return ToolSpecs()
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise errors.InvalidRequest("tool names must be unique", param="tools")
    schemas = {t.function.name: function_dict(t)["parameters"] for t in tools}
    for t in tools:
        if not isinstance(schemas[t.function.name], dict) or schemas[t.function.name].get("type", "object") != "object":
            raise errors.InvalidRequest(
                f"parameters of tool {t.function.name!r} must be a JSON schema of type object", param="tools"
            )
    if choice == "none":
        return ToolSpecs()
    tokenizer.check_tools_supported()
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in schemas:
            raise errors.InvalidRequest(
                f"tool_choice names function {choice.function.name!r}, which is not among the tools", param="tool_choice"
            )
        return ToolSpecs("named", name=choice.function.name, parallel=body.parallel_tool_calls, schemas=schemas)
    if choice == "required":
        return ToolSpecs("required", parallel=body.parallel_tool_calls, schemas=schemas)
    parser = parsers.tool_call or detect_tool_call_parser(tokenizer.chat_template_source)
    if parser is None:
        raise errors.InvalidRequest(
            "tool_choice auto needs a tool-call parser for this model and none is configured or recognised "
            "from its chat template: start the frontend with --dyn-tool-call-parser, or use tool_choice "
            "required or a named function",
            param="tool_choice",
        )
    if parser not in TOOL_CALL_PARSERS:
        raise errors.DynamoError(
            f"this model's worker was started with --dyn-tool-call-parser {parser!r}, which is none "
            f"of {', '.join(TOOL_CALL_PARSERS)}"
        )
    return ToolSpecs("parse", parser=parser, parallel=body.parallel_tool_calls, schemas=schemas)


def detect_tool_call_parser(template: str) -> str | None:
    """The tool-call format a chat template teaches its model, from the markers it writes."""
    if "<function=" in template and "<parameter=" in template:
        return "qwen3_coder"
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return None


def reasoning_parser_for(tokenizer: ModelTokenizer, parsers: ParserNames, template_kwargs: dict[str, Any]) -> str | None:
    if template_kwargs.get("enable_thinking") is False or template_kwargs.get("thinking") is False:
        return None
    if parsers.reasoning is not None:
        if parsers.reasoning not in REASONING_PARSERS:
            raise errors.DynamoError(
                f"this model's worker was started with --dyn-reasoning-parser {parsers.reasoning!r}, "
                f"which is none of {', '.join(REASONING_PARSERS)}"
            )
        return parsers.reasoning
    template = tokenizer.chat_template_source
    if "<think>" not in template:
        return None
    # A template that opens the think block in the generation prompt (DeepSeek-R1) leaves only
    # the closing tag to the model.
    return "deepseek_r1" if "<think>\\n'" in template or "<think>\n'" in template else "qwen3"


# ---------------------------------------------------------------------------- constraints


def _constraint(body: SamplingFields, response_format: ResponseFormat | None, tools: ToolSpecs) -> OutputConstraint | None:
    found: list[tuple[str, OutputConstraint]] = []
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            found.append(("response_format", OutputConstraint("json_object")))
        else:
            spec = response_format.json_schema
            if spec is None or spec.schema is None:
                raise errors.InvalidRequest(
                    "response_format of type json_schema needs json_schema.schema", param="response_format.json_schema"
                )
            found.append(("response_format", OutputConstraint("json_schema", _schema_text(spec.schema, "response_format"))))
    so = body.structured_outputs
    if so is not None:
        given = [(k, v) for k in ("json", "regex", "choice", "grammar", "json_object") if (v := getattr(so, k)) not in (None, False)]
        if len(given) != 1:
            raise errors.InvalidRequest(
                "structured_outputs takes exactly one of json, regex, choice, grammar, json_object", param="structured_outputs"
            )
        found.append(("structured_outputs", _vllm_constraint(given[0][0], given[0][1], "structured_outputs")))
    for key, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        value = getattr(body, key)
        if value is not None:
            found.append((key, _vllm_constraint(kind, value, key)))
    if tools.mode == "named":
        assert tools.name is not None
        found.append(("tool_choice", OutputConstraint("json_schema", _schema_text(tools.schemas[tools.name], "tools"))))
    elif tools.mode == "required":
        found.append(("tool_choice", OutputConstraint("json_schema", _schema_text(_required_calls_schema(tools), "tools"))))
    if len(found) > 1:
        raise errors.InvalidRequest(
            f"{found[0][0]} and {found[1][0]} both constrain the output; give one", param=found[1][0]
        )
    return found[0][1] if found else None


def _vllm_constraint(kind: str, value: Any, param: str) -> OutputConstraint:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise errors.InvalidRequest(f"{param}: the JSON schema is not valid JSON: {exc}", param=param) from None
        return OutputConstraint("json_schema", _schema_text(value, param))
    if kind == "json_object":
        return OutputConstraint("json_object")
    if kind == "choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise errors.InvalidRequest(f"{param}: choice must be a non-empty list of non-empty strings", param=param)
        return OutputConstraint("choice", json.dumps(value, ensure_ascii=False))
    if not isinstance(value, str) or not value:
        raise errors.InvalidRequest(f"{param}: {kind} must be a non-empty string", param=param)
    return OutputConstraint(kind, value)  # type: ignore[arg-type]


def _schema_text(schema: Any, param: str) -> str:
    if not isinstance(schema, dict):
        raise errors.InvalidRequest("a JSON schema must be an object", param=param)
    # The client's key order: it is the order the grammar makes the model write properties in.
    return json.dumps(schema, ensure_ascii=False)


def _required_calls_schema(tools: ToolSpecs) -> dict[str, Any]:
    """tool_choice required: a JSON list of calls, each naming one of the tools and carrying
    arguments valid for it (the shape vLLM uses, so the same model prompts work)."""
    items = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, schema in tools.schemas.items()
        ]
    }
    out: dict[str, Any] = {"type": "array", "minItems": 1, "items": items}
    if not tools.parallel:
        out["maxItems"] = 1
    return out


# ---------------------------------------------------------------------------- the requests


def _check_vocab(token_ids: list[int], tokenizer: ModelTokenizer, param: str) -> None:
    vocab = tokenizer.vocab_size
    for t in token_ids:
        if t >= vocab:
            raise errors.InvalidRequest(f"token id {t} is outside the vocabulary (size {vocab})", param=param)


def _logit_bias(body: SamplingFields, tokenizer: ModelTokenizer) -> dict[int, float]:
    if not body.logit_bias:
        return {}
    out: dict[int, float] = {}
    for key, bias in body.logit_bias.items():
        try:
            token = int(key)
        except ValueError:
            raise errors.InvalidRequest(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token < tokenizer.vocab_size:
            raise errors.InvalidRequest(
                f"logit_bias token id {token} is outside the vocabulary (size {tokenizer.vocab_size})", param="logit_bias"
            )
        out[token] = float(bias)
    return out


def _prepare(
    body: SamplingFields,
    card: ModelCard,
    tokenizer: ModelTokenizer,
    request_id: str,
    prompts: list[list[int]],
    max_tokens: int | None,
    max_tokens_param: str,
    prompt_param: str,
    *,
    logprobs: bool = False,
    top_logprobs: int = 0,
    constraint: OutputConstraint | None = None,
    tools: ToolSpecs = ToolSpecs(),
    reasoning: str | None = None,
    prompt_logprobs: int | None = None,
    legacy_logprobs: bool = False,
) -> Prepared:
    _refuse_common(body)
    context = card.context_length
    longest = max(len(p) for p in prompts)
    for i, token_ids in enumerate(prompts):
        param = prompt_param if len(prompts) == 1 else f"{prompt_param}[{i}]"
        if not token_ids:
            raise errors.InvalidRequest("the prompt is empty", param=param)
        if len(token_ids) >= context:
            raise errors.InvalidRequest(
                f"This model's maximum context length is {context} tokens. However, your "
                f"{param} resulted in {len(token_ids)} tokens, leaving no room for a completion.",
                param=param,
            )
    room = context - longest
    if max_tokens is None:
        max_tokens = room  # OpenAI semantics: generate up to the end of the context
    elif max_tokens > room:
        raise errors.InvalidRequest(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{longest + max_tokens} tokens ({longest} in the {prompt_param}, {max_tokens} "
            f"in the completion). Please reduce the {prompt_param} or {max_tokens_param}.",
            param=max_tokens_param,
        )
    if body.min_tokens > max_tokens:
        raise errors.InvalidRequest(
            f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})", param="min_tokens"
        )
    if body.top_k is not None and body.top_k != -1 and body.top_k < 1:
        raise errors.InvalidRequest(f"top_k must be -1 (off) or >= 1, got {body.top_k}", param="top_k")

    stop = body.stop
    stop_strings: tuple[str, ...] = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not s for s in stop_strings):
        raise errors.InvalidRequest("stop strings must not be empty", param="stop")

    user_stop_ids = list(body.stop_token_ids or ())
    if user_stop_ids:
        _check_vocab(user_stop_ids, tokenizer, "stop_token_ids")
    wire_stop_ids = list(user_stop_ids)
    if not body.ignore_eos:
        wire_stop_ids.extend(t for t in tokenizer.eos_token_ids if t not in wire_stop_ids)

    stop_conditions = StopConditions(
        max_tokens=max_tokens, stop_token_ids=wire_stop_ids, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos
    )
    logit_bias = _logit_bias(body, tokenizer)
    n = body.n
    choices: list[ChoiceSpec] = []
    for p, token_ids in enumerate(prompts):
        for i in range(n):
            index = p * n + i
            # Choices of one request differ by seed, reproducibly when a seed is given.
            seed = body.seed + i if body.seed is not None and i else body.seed
            sampling = SamplingOptions(
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k if body.top_k not in (None, -1) else None,
                min_p=body.min_p,
                seed=seed,
                logprobs=logprobs,
                top_logprobs=top_logprobs,
                logit_bias=logit_bias,
                repetition_penalty=body.repetition_penalty,
                frequency_penalty=body.frequency_penalty or None,
                presence_penalty=body.presence_penalty or None,
            )
            choices.append(
                ChoiceSpec(
                    index,
                    PreprocessedRequest(
                        request_id=request_id if index == 0 else f"{request_id}-{index}",
                        model=body.model,
                        token_ids=token_ids,
                        sampling=sampling,
                        stop=stop_conditions,
                        constraint=constraint,
                        prompt_logprobs=prompt_logprobs if i == 0 else None,
                    ),
                    prompt_index=p,
                )
            )
    output = OutputSpec(
        stop_strings=stop_strings,
        stop_token_ids=frozenset(wire_stop_ids),
        max_tokens=max_tokens,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        tools=tools,
        reasoning_parser=reasoning,
        legacy_logprobs=legacy_logprobs,
    )
    return Prepared(
        request_id=request_id,
        model=body.model,
        choices=choices,
        output=output,
        stream=body.stream,
        include_usage=body.stream_options is not None and body.stream_options.include_usage,
        prompt_tokens=sum(len(p) for p in prompts),
    )
