"""The overrides of a one-epoch ``demo_scratch`` run small enough for tests of ``glassmetric fit``."""

#: 64 px images
SMALL = ("data.image_size=64", "data.resize=64")
#: one epoch on 12 classes x 6 images, 2 of the training classes for validation
TINY_RUN = (
    "data.num_workers=0",
    "data.synthetic.num_classes=12",
    "data.synthetic.images_per_class=6",
    "data.val_classes=2",
    "model.embedding_dim=16",
    "trainer.batch_size=12",
    "trainer.samples_per_class=3",
    "trainer.max_epochs=1",
    "trainer.progress_bar=false",
    "eval.batch_size=32",
)
