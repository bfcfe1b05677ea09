"""The byte vocabulary shared by the data pipeline and the model.

Ids 0..255 are raw bytes. Two special ids follow them; they never occur inside a document.
"""

N_BYTES = 256
EOD_ID = 256  # end of document: separates packed documents; the byte after it starts a new document
PAD_ID = 257  # padding of a window in one-document-per-window mode (its label is IGNORE_INDEX)
VOCAB_SIZE = 258
IGNORE_INDEX = -100  # label value that the loss skips (torch.nn.functional.cross_entropy default)
