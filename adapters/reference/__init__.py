"""The reference adapter: a minimal Llama-style decoder with in-prefill token reduction (:mod:`.decoder`), the
tiny LVLM the project trains and ships (:mod:`.tiny_lvlm`, :mod:`.shapes_world`, :mod:`.train`), and the demo,
quality and calibration commands built on them. See the README, "The reference decoder and the tiny LVLM"."""
