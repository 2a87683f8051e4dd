"""Record the training region in the card of a model saved without one.

``python scripts/model_region.py MODEL.pt [...]`` draws the model's training data set from the
generate config in its card (``data_config``; as `neuroscale generate` draws it, without
solving), computes its :class:`~neuroscale_couple.region.TrainingRegion` and saves the model
with it (atomically; same weights, new digest). `neuroscale train` records the region itself.
"""

from __future__ import annotations

import argparse
import json

from neuroscale_couple.operators.base import load_operator
from neuroscale_couple.region import TrainingRegion


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    for path in p.parse_args().models:
        model = load_operator(path)
        region = TrainingRegion.from_config(model.card["data_config"])
        model.card["region"] = region.to_dict()
        model.save(path)
        print(path, json.dumps(model.card["region"]))


if __name__ == "__main__":
    main()
