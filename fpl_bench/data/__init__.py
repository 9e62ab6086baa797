"""Data: sources -> class split -> client partition (no backbone is known here).

catalog.py      dataset cards (``datasets/*.toml``), validated, keyed by name
sources.py      ``load_source(card, root=, options=, cache_dir=) -> Splits`` for every kind
imageset.py     ``ImageSet`` (in memory or file-backed, domain ids) and ``Splits``
synthetic.py    the embedded generated source (Latin-square class order)
coop_layout.py  CoOp folders + split_zhou_*.json (seeded class-folder fallback)
aircraft.py     FGVC-Aircraft: variants.txt + images_variant_{train,val,test}.txt
imagenet.py     ImageNet: train/ and val/ class folders + CoOp's classnames.txt
cifar.py        CIFAR-10/100 pickles through a restricted unpickler
domains.py      one folder per domain (Office-Caltech10, DomainNet, PACS)
imagefolder.py  any class-per-folder tree (ImageFolder layout), seeded split in the cache
folders.py      safe split paths, listings, seeded splits, split files and lists, scans
problems.py     what can be wrong on disk, as data
check.py        ``fpl-bench data check``
loading.py      decode + a backbone's preprocess transform, in batches
split.py        base/novel class split
partition.py    pathological, dirichlet, iid, by-domain client partitions
"""
