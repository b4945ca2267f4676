"""Layer 3: speculative decoding: proposers (what to guess next) and the policy (when guessing pays).
Verification is the runner's and the sampler's (`Sampler.verify`); the scheduler only sees token counts."""

from inferd.spec_decode.draft_model import DraftModelProposer
from inferd.spec_decode.ngram import NgramProposer
from inferd.spec_decode.policy import SPECULATIVE_MODES, SpeculativePolicy, make_proposer

__all__ = ["DraftModelProposer", "NgramProposer", "SPECULATIVE_MODES", "SpeculativePolicy", "make_proposer"]
