"""ReferIt (RefCLEF) in its usual refer layout: saiapr_tc-12 images, masks in ``instances.json``.

Layout::

    <root>/images/saiapr_tc-12/<file_name>                 # flattened (refer's download), or
    <root>/images/saiapr_tc-12/<NN>/images/<file_name>     # the original IAPR TC-12 tree
    <root>/refclef/instances.json                          # segmentations (RLE or polygons)
    <root>/refclef/refs(unc).p | refs(berkeley).p

``unc`` has splits train/val/testA/testB/testC and ``berkeley`` train/val/test.  Records,
masks and errors are exactly those of :class:`vipa_jax.data.refer.ReferDataset`.
"""

from __future__ import annotations

import os

from vipa_jax.data.refer import ReferDataset

SAIAPR_DIR = os.path.join("images", "saiapr_tc-12")


class ReferItDataset(ReferDataset):
    """ReferIt / RefCLEF expressions of one split (``split_by`` is ``unc`` or ``berkeley``)."""

    def __init__(
        self, root: str, split_by: str = "berkeley", split: str = "train", on_error: str = "raise"
    ):
        super().__init__(
            root, "refclef", split_by=split_by, split=split, on_error=on_error, image_dir=SAIAPR_DIR
        )

    def resolve_image(self, file_name: str) -> str:
        """Flat ``saiapr_tc-12/<name>`` if present, else ``saiapr_tc-12/<NN>/images/<name>``."""
        flat = os.path.join(self.image_dir, file_name)
        if os.path.isfile(flat):
            return flat
        stem = os.path.splitext(os.path.basename(file_name))[0]
        if stem.isdigit():
            nested = os.path.join(self.image_dir, f"{int(stem) // 1000:02d}", "images", file_name)
            if os.path.isfile(nested):
                return nested
        return flat
