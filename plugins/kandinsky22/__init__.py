"""Kandinsky 2.2: LoRA on the decoder UNet (arch ``kandinsky22``) or on the prior (``kandinsky22-prior``).

Kandinsky 2.2 generates in two stages. The *prior* (``PriorTransformer``) turns a caption
into a CLIP image embedding; the *decoder* (``UNet2DConditionModel`` + MoVQ) turns that
embedding into an image. Each stage is trained on its own:

* ``kandinsky22`` (:class:`Decoder`): the decoder UNet learns to denoise MoVQ latents of a
  training image, conditioned on the CLIP image embedding of the same image (captions are
  not used).
* ``kandinsky22-prior`` (:class:`Prior`): the prior learns to predict the normalised CLIP
  image embedding of a training image from its caption (CLIP text model), with the prior's
  own ``UnCLIPScheduler`` (prediction of the sample).

Model folder. The decoder needs the CLIP image encoder, which on the Hub lives in the prior
repository, so a ``kandinsky22`` model folder is the decoder with the prior inside it::

    k22/                     kandinsky-community/kandinsky-2-2-decoder (unet, movq, scheduler)
    k22/prior/               kandinsky-community/kandinsky-2-2-prior (prior, text_encoder,
                             tokenizer, image_encoder, image_processor, scheduler)

``lorakit tiny kandinsky22 DIR`` writes exactly that; ``kandinsky22-prior`` trains on
``k22/prior`` (or any prior folder). ``lorakit generate`` chains prior -> decoder with
``KandinskyV22CombinedPipeline`` and accepts decoder and prior LoRAs together.

Kandinsky pipelines have no ``load_lora_weights``: :func:`load_lora_into` is the way back
(see :mod:`.lora_io` for the file format).

Modules: ``decoder`` and ``prior`` (the two arch classes, on the shared ``base``),
``layout`` (model folders), ``clip`` (the CLIP image embedding), ``lora_io`` (LoRA files),
``pipeline`` (inference), ``tiny`` (tiny-model writers). Registered through the
``lorakit.archs`` entry points ``kandinsky22`` and ``kandinsky22-prior``, which name the
classes. Nothing here imports torch at import time.
"""

from lorakit.checkpoints import WEIGHT_NAME

from .clip import clip_pixel_values
from .decoder import Decoder
from .lora_io import load_lora_into
from .prior import Prior

__all__ = ["Decoder", "Prior", "load_lora_into", "clip_pixel_values", "WEIGHT_NAME"]
