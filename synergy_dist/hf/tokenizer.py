"""The byte tokenizer of an exported SynergyLM: ids 0..255 are the UTF-8 bytes, then EOD and PAD
(data_pipeline/vocab.py). Exported as tokenization_synergy.py (synergy_dist/hf/source.py).

No special token is added when encoding (lm-evaluation-harness scores rolling perplexity from its own prefix
token, `bos_token` = EOD); to read a prompt the way synergy-generate does, put EOD before it:
`tokenizer(tokenizer.bos_token + text)`.
"""

from __future__ import annotations

from transformers.tokenization_python import AddedToken, PreTrainedTokenizer

from data_pipeline.vocab import EOD_ID, N_BYTES, PAD_ID

EOD_TOKEN, PAD_TOKEN = "<eod>", "<pad>"


class SynergyByteTokenizer(PreTrainedTokenizer):
    """A byte is the token chr(byte); decoding joins the bytes and reads them as UTF-8 (invalid bytes become
    U+FFFD, as a terminal would show them)."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, bos_token=EOD_TOKEN, eos_token=EOD_TOKEN, pad_token=PAD_TOKEN, **kwargs):
        # the special ids are fixed by the vocabulary, whatever a saved config lists
        self._added_tokens_decoder = {EOD_ID: AddedToken(EOD_TOKEN, special=True),
                                      PAD_ID: AddedToken(PAD_TOKEN, special=True)}
        kwargs.pop("added_tokens_decoder", None)
        super().__init__(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        return N_BYTES

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(i): i for i in range(N_BYTES)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if len(token) != 1 or ord(token) >= N_BYTES:
            raise ValueError(f"token {token!r} is not a byte of the vocabulary: tokens are single characters "
                             f"chr(0)..chr(255), {EOD_TOKEN} or {PAD_TOKEN}")
        return ord(token)

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < N_BYTES:
            raise ValueError(f"token id {index} is outside the byte vocabulary: ids 0..255 are bytes, "
                             f"{EOD_ID} is {EOD_TOKEN}, {PAD_ID} is {PAD_TOKEN}")
        return chr(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        special = {EOD_TOKEN, PAD_TOKEN}
        data = b"".join(t.encode("utf-8") if t in special else bytes([ord(t)]) for t in tokens)
        return data.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is the 256 bytes: nothing to write
