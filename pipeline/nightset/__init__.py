"""Building a night query set as the thesis built SF-XL test night (issue 7).

collect (geotagged photos of an area, Flickr API) -> filter (outdoor, night) ->
dedupe (near-identical shots) -> relabel (a local web tool, append-only log) ->
verify (a database image within 25 m; VG file names; counts at each step).
Each stage reads and writes CSV tables (atomically) so it can be a Snakemake rule.

Modules: ``collect`` (stage 1 and its CLI), ``flickr`` (its Flickr REST client),
``photos`` (reading photos and label tables), ``stats_models`` (statistics baselines),
``mobilenet`` (the CNN classifier and its trainer), ``classify`` (stage 2: the
classifier registry, the filter stage, its CLI), ``dedupe`` (stage 3), ``relabel``
(stage 4 and its CLI), ``relabel_log`` (its decision log, replay into labels.csv and
review state), ``relabel_server`` (its local HTTP server and page), ``verify`` (stage 5).
"""
