"""A picklable fast translator for other engines (Ray Data, Spark, a web service).

    from fairseq_fastseq.library import FastGenerator

    translator = FastGenerator.from_checkpoint("model.pt", "data-bin", bpe="sentencepiece",
                                               sentencepiece_model="spm.model", beam=5)
    translator.generate({"v1": "En el principio crió Dios los cielos y la tierra."})
    # {'v1': 'In the beginning God created the heavens and the earth.'}

The object holds paths and options only; each process that unpickles it loads the model
once, on first use (fairseq's hub interface, with ``generator="fast"``), so it can be
shipped to workers of any engine.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Hashable, Mapping, Optional, Sequence, Union


@dataclass
class FastGenerator:
    checkpoint: str
    data: str
    hub_options: Dict[str, Any] = field(default_factory=dict)  # from_pretrained: bpe, tokenizer, ...
    generation: Dict[str, Any] = field(default_factory=dict)  # beam, lenpen, max_len_b, ...
    _hub: Any = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Union[str, Path],
        data: Union[str, Path],
        bpe: Optional[str] = None,
        tokenizer: Optional[str] = None,
        sentencepiece_model: Optional[str] = None,
        bpe_codes: Optional[str] = None,
        **generation: Any,
    ) -> "FastGenerator":
        """``checkpoint`` (a fairseq ``.pt``) with the dictionaries of data-bin ``data``; the
        BPE/tokenizer options are fairseq's (``bpe="sentencepiece"``, ``tokenizer="moses"``)."""
        extra = dict(bpe=bpe, tokenizer=tokenizer, sentencepiece_model=sentencepiece_model, bpe_codes=bpe_codes)
        hub_options = {name: str(value) for name, value in extra.items() if value is not None}
        return cls(str(checkpoint), str(data), hub_options, generation)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(vars(self))
        state["_hub"] = None  # each process loads its own copy
        return state

    def generate(self, sentences: Union[Sequence[str], Mapping[Hashable, str]]) -> Dict[Hashable, str]:
        """Translations keyed like the input: by the mapping's keys, or by position."""
        keyed = dict(sentences) if isinstance(sentences, Mapping) else dict(enumerate(sentences))
        from .choice import attention_unread

        with attention_unread():  # text out: no attention read
            translations = self._loaded().translate(list(keyed.values()), generator="fast", **self.generation)
        return dict(zip(keyed, translations))

    def _loaded(self) -> Any:
        if self._hub is None:
            import fairseq_fastseq  # noqa: F401  (registers the fast generator and safe loading)
            from fairseq.models.transformer import TransformerModel

            checkpoint = Path(self.checkpoint)
            self._hub = TransformerModel.from_pretrained(
                str(checkpoint.parent), checkpoint_file=checkpoint.name, data_name_or_path=self.data, **self.hub_options
            ).eval()
        return self._hub
