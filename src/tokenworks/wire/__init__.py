"""Wire formats: pure, synchronous translations between the dialects agents speak.

Nothing here does I/O of its own; every function takes and returns plain JSON values (dicts)
or SSE bytes, so the translations are tested against recorded provider traffic without HTTP.

Modules:
- `sse`: `SSESplitter` cuts a byte stream into whole events, each returned as the exact bytes
  it arrived as (pass-through keeps CRLF, comments and `event:` lines); `data_of` reads an
  event's data; `encode_event` frames our own.
- `anthropic`: Messages <-> chat completions (requests, responses, stream translators both
  ways, errors, `usage_from_messages` / `MessagesUsageCollector` into `metering.usage.Usage`).
- `responses`: Responses -> chat completions requests; chat completions -> Response objects
  and the Responses typed event stream.
- `openai`: the chat completions bytes the relay passes through: `SSEReader` (given the
  function that reads the upstream), `event_data`, the model and cost splices, the usage chunk
  the gateway writes, `reported_usage`.
- `common`: `Untranslatable` (and `PreviousResponseUnsupported`): what the target dialect
  cannot express; a route answers it with a 400 in the client's error shape, naming `param`.

How a route uses them (once the relay can hand a route its upstream body and stream):

    # POST /v1/messages on a producer that speaks chat completions only
    try:
        chat_body = anthropic.messages_request_to_chat(body)
    except Untranslatable as e:
        return anthropic_error(400, "invalid_request_error", e.message)   # before any hold
    chat_body["model"] = upstream_model
    # ... price, hold and send chat_body upstream exactly as /v1/chat/completions does ...
    if not streaming:
        if status >= 400:
            status, err = anthropic.openai_error_to_anthropic(status, upstream_json)
        else:
            answer = anthropic.chat_response_to_messages(upstream_json)
        # meter from the upstream's own usage (metering.extract.usage_from_openai)
    else:
        splitter, stream = sse.SSESplitter(), anthropic.ChatToMessagesStream(model=public_model)
        async for chunk in upstream:
            for frame in splitter.feed(chunk):
                out = stream.feed_sse(frame)      # `[DONE]` yields message_delta/message_stop
                if out: await send(out)
        usage = stream.usage()                    # None: estimate, as the relay does today

    # POST /v1/chat/completions on an Anthropic producer: the mirror image
    messages_body = anthropic.chat_request_to_messages(body)
    ... anthropic.messages_response_to_chat(answer) / anthropic.MessagesToChatStream(
            include_usage=client_asked_for_usage).feed_sse(frame) ...
    usage = stream.usage()  # cache writes and reads included, from MessagesUsageCollector

    # POST /v1/responses on a chat-completions producer
    chat_body = responses.responses_request_to_chat(body)  # PreviousResponseUnsupported -> 400
    ... responses.chat_response_to_responses(upstream_json, body)
    ... responses.ChatToResponsesStream(body).feed_sse(frame)

    # pass-through (the producer speaks the client's dialect): forward each frame from
    # SSESplitter unchanged and feed `data_of(frame)` to a usage reader on the side, e.g.
    # anthropic.MessagesUsageCollector for /v1/messages.

The stream translators never emit their closing events unless told the upstream finished
(`[DONE]` or `message_stop`): a cut upstream stays visibly cut for the client. The route then
sends the dialect's own error event (`ChatToMessagesStream.error_event`).
"""

from tokenworks.wire.common import PreviousResponseUnsupported, Untranslatable

__all__ = ["PreviousResponseUnsupported", "Untranslatable"]
