"""Building a night query set as the thesis built SF-XL test night (issue 7).

collect (geotagged photos of an area, Flickr API) -> filter (outdoor, night) ->
dedupe (near-identical shots) -> relabel (a local web tool, append-only log) ->
verify (a database image within 25 m; VG file names; counts at each step).
Each stage reads and writes CSV tables (atomically) so it can be a Snakemake rule.

Modules: ``collect`` (stage 1), ``photos`` (reading photos and label tables),
``stats_models`` (statistics baselines), ``mobilenet`` (the CNN classifier and its
trainer), ``classify`` (stage 2: the classifier registry, the filter stage, its CLI),
``dedupe`` (stage 3), ``relabel`` (stage 4), ``verify`` (stage 5).
"""
