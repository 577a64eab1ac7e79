"""The disguises: what each slot's node receives of a product, and how its results are undone.

`DistributedCompute` (distributed.py) decides whether a product ships, sends its parts and
collects the results; everything secret about a product is here, each constant defined once:

- `mixing`: the secret block-diagonal mixing `Mixing` every disguise uses (with its own block size
  and spread);
- `base`: a product's `Part`s (one slot's matmul) and the `Product` protocol (parts, meanwhile, undo);
- `pixel_share`: the pixel-wide products x_w1 and dw1 (`PixelDisguise`) and the "share" disguise
  of them (`PixelShare`: static blocks of mixed pixels with per-image noise);
- `shuffle`: the "shuffle" control of them (`PixelShuffle`: positions hidden, values in the clear
  up to power-of-two scales);
- `hidden_share`: a hidden-to-hidden layer's products under every disguise without resident
  weights for it (`HiddenShare`: fresh mixing and noise per batch);
- `decoy`: a delta's class structure moved onto other rows, for dw1 and the hidden backward;
- `resident`: the "resident" disguise, the first layer's weights kept on the nodes in a secret
  basis (`ResidentBasis`, `ResidentDisguise`), and its clear control "resident-clear";
- `resident_hidden`: a momentum hidden layer's rows kept on the nodes (`HiddenResident`).
"""

DISGUISES = ("resident", "share", "shuffle", "resident-clear")  # resident-clear: the resident design's control
