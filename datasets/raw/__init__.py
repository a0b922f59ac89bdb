"""Decoding the raw files of the paper's datasets (issue 11): audio, video, images, text.

Each module turns one raw file into the stored array of the canonical format and names the file in
every error (``RawDataError``): ``audio`` (WAV → Kaldi log-mel filterbank), ``video`` (MP4/AVI or a
folder of extracted frames → uint8 frames), ``image`` (JPG/PNG → uint8 pixels), ``text`` (strings →
token ids and lengths from a Hugging Face tokenizer whose identity goes into the manifest), ``layout``
(checking a raw tree up front, ``--skip-bad``).
"""
