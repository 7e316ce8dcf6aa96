"""fairseq-generate's text output for one generated batch, computed away from the decoder.

A ``BatchFormatter`` turns a ``GeneratedBatch`` (CPU tensors only) into the exact lines
``fairseq-generate`` prints for it (``S-``, ``T-``, ``H-``, ``D-``, ``P-``, ``A-``, ``I-``,
``E-``) and into what its scorer is fed. It is a pure function of the batch: it runs in
post-processing workers (processes or threads) while the main process decodes the next
batches, and never mutates the dictionaries it shares with them. Everything that must
happen in order (writing, scoring, which grows the target dictionary) stays with the
caller, in the order batches were generated.
"""

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from fairseq.data import Dictionary
from fairseq.utils import replace_unk

# What the scorer receives for one sentence: ("strings", target, hypothesis) for scorers with
# ``add_string``; ("encode", target, hypothesis) when fairseq re-encodes the post-processed
# strings with the target dictionary first; ("tokens", target, hypothesis) as int tensors.
ScoreInput = Tuple[str, Any, Any]


@dataclass
class GeneratedBatch:
    """One batch as the generator left it, moved to the CPU."""

    ids: List[int]
    src_tokens: Optional[torch.Tensor]  # (batch, source length), padded
    target: Optional[torch.Tensor]  # (batch, target length), padded
    hypotheses: List[List[Dict[str, Any]]]  # per sentence, the nbest kept by fairseq-generate

    # Pickled (for worker processes) as numpy arrays: torch would pass each of the many small
    # tensors through its own shared-memory file, which costs more than the copy.
    def __getstate__(self) -> Dict[str, Any]:
        return {name: map_arrays(value, torch.Tensor.numpy) for name, value in vars(self).items()}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        vars(self).update({name: map_arrays(value, torch.from_numpy) for name, value in state.items()})


def map_arrays(value: Any, convert: Callable[[Any], Any]) -> Any:
    """``value`` with every tensor / numpy array inside dicts, lists and tuples converted."""
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        return convert(value)
    if isinstance(value, dict):
        return {key: map_arrays(item, convert) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_arrays(item, convert) for item in value)
    return value


@dataclass
class FormattedBatch:
    text: str
    score_inputs: List[ScoreInput]


@dataclass
class BatchFormatter:
    """Everything fairseq-generate's per-sentence output depends on, and the code that writes it."""

    src_dict: Optional[Dictionary]
    tgt_dict: Dictionary
    post_process: Optional[str]  # --post-process / --remove-bpe
    tokenizer: Any  # fairseq tokenizer (e.g. moses) or None
    bpe: Any  # fairseq BPE (e.g. subword_nmt, sentencepiece) or None
    align_dict: Optional[Dict[str, str]]  # --replace-unk
    original_text: Any  # the raw-text dataset, for --replace-unk
    symbols_to_strip: Sequence[int]
    quiet: bool
    print_alignment: Optional[str]
    print_step: bool
    retain_iter_history: bool
    scorer_takes_strings: bool

    def decode(self, text: str) -> str:
        """BPE removal then detokenization, as fairseq-generate's ``decode_fn``."""
        if self.bpe is not None:
            text = self.bpe.decode(text)
        if self.tokenizer is not None:
            text = self.tokenizer.decode(text)
        return text

    def __call__(self, batch: GeneratedBatch) -> FormattedBatch:
        lines: List[str] = []
        score_inputs: List[ScoreInput] = []
        pad = self.tgt_dict.pad()
        for row, sentence_id in enumerate(batch.ids):
            source = None if batch.src_tokens is None else batch.src_tokens[row]
            source = None if source is None else source[source.ne(pad)].tolist()
            target = None if batch.target is None else batch.target[row]
            target = None if target is None else target[target.ne(pad)].int()
            source_str, target_str = self._source_and_target(sentence_id, source, target)
            if not self.quiet:
                if self.src_dict is not None:
                    lines.append(f"S-{sentence_id}\t{source_str}")
                if target is not None:
                    lines.append(f"T-{sentence_id}\t{target_str}")
            for rank, hypothesis in enumerate(batch.hypotheses[row]):
                hypothesis_tokens = hypothesis["tokens"].int()
                hypothesis_str = self.tgt_dict.string(
                    hypothesis_tokens.tolist(), self.post_process, extra_symbols_to_ignore=self.symbols_to_strip
                )
                if self.align_dict is not None:
                    hypothesis_str = replace_unk(
                        hypothesis_str, source_str, hypothesis["alignment"], self.align_dict, self.tgt_dict.unk_string()
                    )
                detokenized = self.decode(hypothesis_str)
                if not self.quiet:
                    lines.extend(self._hypothesis_lines(sentence_id, hypothesis, hypothesis_str, detokenized))
                if target is not None and rank == 0:
                    score_inputs.append(self._score_input(target, target_str, hypothesis_tokens, detokenized))
        return FormattedBatch("".join(line + "\n" for line in lines), score_inputs)

    def _source_and_target(
        self, sentence_id: int, source: Optional[List[int]], target: Optional[torch.Tensor]
    ) -> Tuple[str, Optional[str]]:
        if self.align_dict is not None:  # --replace-unk reads the raw text
            source_str = self.original_text.src.get_original_text(sentence_id)
            target_str = self.original_text.tgt.get_original_text(sentence_id)
        else:
            source_str = "" if self.src_dict is None else self.src_dict.string(source, self.post_process)
            target_str = None
            if target is not None:
                target_str = self.tgt_dict.string(
                    target.tolist(), self.post_process, escape_unk=True, extra_symbols_to_ignore=self.symbols_to_strip
                )
        source_str = self.decode(source_str)
        if target is not None:
            target_str = self.decode(target_str)
        return source_str, target_str

    def _hypothesis_lines(
        self, sentence_id: int, hypothesis: Dict[str, Any], hypothesis_str: str, detokenized: str
    ) -> List[str]:
        score = hypothesis["score"] / math.log(2)  # fairseq prints base-2 scores
        positional = hypothesis["positional_scores"] / math.log(2)
        lines = [
            f"H-{sentence_id}\t{score}\t{hypothesis_str}",
            f"D-{sentence_id}\t{score}\t{detokenized}",
            f"P-{sentence_id}\t" + " ".join(f"{value:.4f}" for value in positional.tolist()),
        ]
        alignment = hypothesis.get("alignment")
        if self.print_alignment == "hard":
            pairs = alignment.tolist() if torch.is_tensor(alignment) else alignment
            lines.append(f"A-{sentence_id}\t" + " ".join(f"{source}-{target}" for source, target in pairs))
        elif self.print_alignment == "soft":
            lines.append(f"A-{sentence_id}\t" + " ".join(",".join(probs) for probs in alignment))
        if self.print_step:
            lines.append(f"I-{sentence_id}\t{hypothesis['steps']}")
        if self.retain_iter_history:
            for step, earlier in enumerate(hypothesis["history"]):
                text = self.tgt_dict.string(earlier["tokens"].int().tolist())
                lines.append(f"E-{sentence_id}_{step}\t{text}")
        return lines

    def _score_input(
        self, target: torch.Tensor, target_str: str, hypothesis_tokens: torch.Tensor, detokenized: str
    ) -> ScoreInput:
        if self.scorer_takes_strings:
            return ("strings", target_str, detokenized)
        if self.align_dict is not None or self.post_process is not None:
            return ("encode", target_str, detokenized)
        return ("tokens", target, hypothesis_tokens)
