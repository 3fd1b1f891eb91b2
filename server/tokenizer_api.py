"""vLLM's tokenizer endpoints: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

Clients that count or build token ids themselves ask the server for its tokenizer (lm-eval's
``local-completions`` picks its remote tokenizer when these answer, so it needs no local copy).
Tokenizing runs on the serving layer's tokenizing thread (server/limits.py).
"""

from __future__ import annotations

from tfb_core import TFBError, encoding

from .errors import BadRequest, NotFound
from .limits import Tokenizing, check_chars
from .loader import ServedModel
from .openai_protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse, TokenizerInfo


class TokenizerServing:
    """The served model's tokenizer, as vLLM's endpoints show it."""

    def __init__(self, model: ServedModel, tokenizing: Tokenizing):
        self.model_id = model.model_id
        self.tokenizer = model.tokenizer
        self.tokenizing = tokenizing
        self.context = model.context_limit
        self.vocab = len(self.tokenizer)
        self.bound = model.token_bound

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise NotFound(f"model {model!r} does not exist; this server serves {self.model_id!r} (GET /v1/models)",
                           param="model", code="model_not_found")

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.check_model(request.model)
        chars = len(request.prompt) if request.prompt is not None else sum(len(m.text) for m in request.messages)
        check_chars(chars, self.bound, "prompt" if request.prompt is not None else "messages", self.context)
        return await self.tokenizing.run(self._tokenize, request)

    def _tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        text, special = request.prompt, request.add_special_tokens
        if request.messages is not None:
            try:
                text = encoding.apply_chat(self.tokenizer, [{"role": "system" if m.role == "developer" else m.role,
                                                    "content": m.text} for m in request.messages],
                                  add_generation_prompt=request.add_generation_prompt)
            except TFBError as e:
                raise BadRequest(f"'messages': {e}", param="messages") from None
            special = bool(special)
        ids = self.tokenizer(text, add_special_tokens=True if special is None else special).input_ids
        strs = self.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.context, tokens=ids, token_strs=strs)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(request.model)
        bad = next((i for i in request.tokens if not 0 <= i < self.vocab), None)
        if bad is not None:
            raise BadRequest(f"'tokens' holds the token id {bad}, outside the model's vocabulary: allowed 0 to "
                             f"{self.vocab - 1}", param="tokens", code="invalid_value")
        return DetokenizeResponse(prompt=await self.tokenizing.run(self.tokenizer.decode, request.tokens))

    def info(self) -> TokenizerInfo:
        t = self.tokenizer
        return TokenizerInfo(tokenizer_class=type(t).__name__, bos_token=t.bos_token, eos_token=t.eos_token,
                             pad_token=t.pad_token, unk_token=t.unk_token,
                             chat_template=getattr(t, "chat_template", None) or None,
                             model_max_length=self.context, vocab_size=self.vocab)
