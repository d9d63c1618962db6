"""POST /v1/responses with the official `openai` SDK and the OpenAI Agents SDK, over real
HTTP, on a producer that speaks Responses (passed through, stored) and on one that speaks
chat completions only (translated, not stored); and GET /v1/models/{id}."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.api.dialects_setup import cost_nano, dialect_gateway
from tests.conftest import Gateway, Sim

BOTH = pytest.mark.parametrize(
    ("model", "producer"), [("m-native", "native"), ("m-chat", "chatonly")]
)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture
def gw(sims: tuple[Sim, Sim], database: str) -> Iterator[Gateway]:
    with dialect_gateway(database, *sims) as gateway:
        yield gateway


def _client(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=gw.v1, max_retries=0, timeout=30)


def _check_charged(record: Any, usage: Any) -> None:
    assert record.usage.input_tokens == usage.input_tokens
    assert record.usage.cached_input_tokens == usage.input_tokens_details.cached_tokens
    assert record.usage.output_tokens == usage.output_tokens
    assert not record.usage.estimated
    assert record.cost_nano == cost_nano(record.usage) > 0
    assert usage.model_extra["cost"] == f"{record.price_nano / 1e9:.9f}".rstrip("0").rstrip(".")


@BOTH
def test_plain_response(gw: Gateway, model: str, producer: str):
    key = gw.create_key()["key"]
    response = _client(gw, key).responses.create(model=model, input="Say hello")
    assert response.model == model and response.status in ("completed", "incomplete")
    assert response.output_text
    [record] = gw.records(1)
    assert (record.endpoint, record.producer, record.status) == ("responses", producer, 200)
    _check_charged(record, response.usage)
    assert response.store is (producer == "native")


@BOTH
def test_streamed_response_has_typed_events_and_usage_in_the_last(
    gw: Gateway, model: str, producer: str
):
    key = gw.create_key()["key"]
    events = list(_client(gw, key).responses.create(model=model, input="Say hello", stream=True))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.model == model and final.output_text
    record = gw.records(1)[-1]
    assert (record.producer, record.streamed) == (producer, True)
    _check_charged(record, final.usage)


@BOTH
def test_function_tools_round_trip(gw: Gateway, model: str, producer: str):
    key = gw.create_key()["key"]
    client = _client(gw, key)
    first = client.responses.create(model=model, input="Weather in Paris?", tools=[WEATHER])
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "sim"}
    inputs: list[Any] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ]  # fmt: skip
    events = list(client.responses.create(model=model, input=inputs, tools=[WEATHER], stream=True))
    final = events[-1].response
    assert final.output_text and not [i for i in final.output if i.type == "function_call"]
    streamed_call = list(
        client.responses.create(model=model, input="Weather?", tools=[WEATHER], stream=True)
    )
    done = [e for e in streamed_call if e.type == "response.function_call_arguments.done"]
    assert [json.loads(e.arguments) for e in done] == [{"city": "sim"}]


def test_structured_output_reaches_a_chat_producer_as_response_format(gw: Gateway):
    key = gw.create_key()["key"]
    fmt = {
        "type": "json_schema",
        "name": "answer",
        "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
        "strict": True,
    }
    response = _client(gw, key).responses.create(
        model="m-chat", input="Answer", text={"format": fmt}
    )  # type: ignore[call-overload]
    assert response.text.format.type == "json_schema"
    assert response.output_text


def test_stored_responses_are_read_and_deleted_on_the_producer_that_stored_them(gw: Gateway):
    key = gw.create_key()["key"]
    client = _client(gw, key)
    first = client.responses.create(model="m-native", input="Remember: the word is 'kite'.")
    again = client.responses.retrieve(first.id)
    assert again.id == first.id and again.model == "m-native"
    follow = client.responses.create(
        model="m-native", input="What was the word?", previous_response_id=first.id
    )
    assert follow.previous_response_id == first.id and follow.output_text
    # The follow-up carried the first turn: more input tokens than its own words.
    assert follow.usage.input_tokens > first.usage.input_tokens
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    other = gw.create_key(name="other")["key"]
    with pytest.raises(openai.NotFoundError):  # another key cannot read it
        _client(gw, other).responses.retrieve(follow.id)


def test_translated_responses_are_not_stored_and_say_so(gw: Gateway):
    key = gw.create_key()["key"]
    client = _client(gw, key)
    response = client.responses.create(model="m-chat", input="hi")
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="m-chat", input="and?", previous_response_id=response.id)
    assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_models_retrieve_with_the_keys_price(gw: Gateway):
    key = gw.create_key(models=["m-chat", "m-native"])["key"]
    client = _client(gw, key)
    model = client.models.retrieve("m-chat")
    assert (model.id, model.object, model.owned_by) == ("m-chat", "model", "tokenworks")
    listed = {m.id: m for m in client.models.list()}
    assert model.model_dump() == listed["m-chat"].model_dump()
    assert model.model_extra["pricing"]["input_per_mtok"] == "1"
    for unknown in ("nope", "m-claude"):  # unknown, and beyond the key's scope
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve(unknown)
        assert missing.value.code == "model_not_found"
    raw = httpx.get(f"{gw.v1}/models/m-chat", timeout=10)
    assert raw.status_code == 401 and raw.json()["error"]["code"] == "missing_api_key"


@BOTH
def test_an_openai_agents_sdk_agent_runs_a_function_tool(gw: Gateway, model: str, producer: str):
    agents = pytest.importorskip("agents")
    key = gw.create_key()["key"]
    agents.set_tracing_disabled(True)
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    client = openai.AsyncOpenAI(api_key=key, base_url=gw.v1, max_retries=0, timeout=30)
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the tool.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(model=model, openai_client=client),
    )
    result = agents.Runner.run_sync(agent, "Weather in Paris?", max_turns=4)
    assert seen == ["sim"]
    assert isinstance(result.final_output, str) and result.final_output
    records = gw.records(2)
    assert [(r.endpoint, r.producer, r.status) for r in records] == [
        ("responses", producer, 200)
    ] * 2
    assert all(r.cost_nano == cost_nano(r.usage) > 0 for r in records)


def test_a_chat_producers_reasoning_becomes_a_reasoning_summary(gw: Gateway):
    key = gw.create_key()["key"]
    client = _client(gw, key)
    response = client.responses.create(
        model="m-reason", input="Think, then answer", reasoning={"effort": "low", "summary": "auto"}
    )
    [reasoning] = [item for item in response.output if item.type == "reasoning"]
    assert reasoning.summary and reasoning.summary[0].text
    assert response.output_text
    record = gw.records(1)[-1]
    details = response.usage.output_tokens_details
    assert record.usage.reasoning_tokens == details.reasoning_tokens > 0
    events = list(
        client.responses.create(model="m-reason", input="Think, then answer", stream=True)
    )
    kinds = [event.type for event in events]
    assert "response.reasoning_summary_text.delta" in kinds
    assert kinds.index("response.reasoning_summary_text.done") < kinds.index(
        "response.output_text.delta"
    )


def test_a_continuation_goes_to_the_producer_that_stored_the_response(
    gw: Gateway, sims: tuple[Sim, Sim]
):
    key = gw.create_key()["key"]
    client = _client(gw, key)
    sims[0].fault("500")  # the first deployment fails: the second one serves and stores it
    first = client.responses.create(model="m-two", input="Remember 'kite'.")
    assert gw.records(1)[-1].producer == "native2"
    # One failure leaves "native"'s breaker closed: the router would pick it first again.
    assert gw.app.state.gateway.dispatcher.available(
        gw.app.state.gateway.router.routes["m-two"].deployments[0]
    )
    follow = client.responses.create(
        model="m-two", input="What was it?", previous_response_id=first.id
    )
    assert follow.previous_response_id == first.id
    assert gw.records(2)[-1].producer == "native2"
