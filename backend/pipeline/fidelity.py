"""FREESEG_FIDELITY: each stage's rule, ours (``default``) or the authors' released code's (``release``).

The two differ in five places (docs/method.md says why ours differ);
everything else, features, K-means, the assignment of labels to clusters and the CRF, is the
same either way. The rules are chosen once, when the process builds its pipeline, and each
stage is handed its own:

| stage | ours | release |
| --- | --- | --- |
| caption length (``Captioner``) | 30 tokens after BLIP's prompt | 30 tokens with the prompt |
| nouns | NOUN lemmas, an ADJ's NOUN head, each once | NOUN text, any ADJ's head, repeats kept |
| candidates | exact names outright; CLIP, prompt template, cosine | SD text encoder, 77-token mean, correlation |
| mask naming | prompts of name and synonyms, padded to square | bare names, CLIP's centre crop |
| PAMR (``Refiner``) | soft > 0.5 | soft / its maximum >= 0.5 |
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from backend.options import Fidelity, NounSource
from backend.pipeline.caption import OURS, RELEASE, CaptionLength
from backend.pipeline.candidates import (
    CandidateRule,
    ClipCandidates,
    NounRule,
    ReleaseCandidates,
    caption_nouns,
    caption_words,
    release_caption_nouns,
)
from backend.pipeline.clip_embeddings import TextImageEmbedder
from backend.pipeline.labelling import BARE_NAMES_CROPPED, PROMPTS_PADDED, MaskNaming
from backend.pipeline.refine import SoftThreshold, above_half, above_half_of_peak
from backend.pipeline.sd_text import TextPooler


@dataclass(frozen=True)
class StageRules:
    """The rule of each stage where ours and the released code's differ."""

    caption_length: CaptionLength
    nouns: NounRule
    candidates: CandidateRule
    naming: MaskNaming
    pamr_threshold: SoftThreshold


def our_rules(clip: TextImageEmbedder) -> StageRules:
    return StageRules(caption_length=OURS, nouns=caption_nouns, candidates=ClipCandidates(clip),
                      naming=PROMPTS_PADDED, pamr_threshold=above_half)


def release_rules(stable_diffusion_text: TextPooler) -> StageRules:
    return StageRules(caption_length=RELEASE, nouns=release_caption_nouns,
                      candidates=ReleaseCandidates(stable_diffusion_text), naming=BARE_NAMES_CROPPED,
                      pamr_threshold=above_half_of_peak)


def stage_rules(fidelity: Fidelity, clip: TextImageEmbedder, stable_diffusion_text: TextPooler,
                nouns: NounSource = "spacy") -> StageRules:
    """The rules FREESEG_FIDELITY names, over the models they use; FREESEG_NOUNS=words takes the caption's
    words for its nouns under either."""
    builders = {"default": lambda: our_rules(clip), "release": lambda: release_rules(stable_diffusion_text)}
    rules = builders[fidelity]()
    return rules if nouns == "spacy" else replace(rules, nouns=caption_words)
