"""The toy world: the embedded default scale (offline, CPU, minutes).

- :mod:`vopd.toy.tokenizer`: the 31-token character tokenizer (a real transformers tokenizer).
- :mod:`vopd.toy.world`: the seeded arithmetic generator, worked solutions, the multiple-choice
  form, disjoint splits.
- :mod:`vopd.toy.sft`: teacher and student (``LlamaForCausalLM`` from a config) trained by SFT.
- :mod:`vopd.toy.ship`: the shipped teacher and student of the default world (``shipped/``).

    python -m vopd.toy world --out resources/toy
    python -m vopd.toy sft --world resources/toy --out resources/toy/models
"""
