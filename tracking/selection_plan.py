"""The plan of a study with a ``selection:`` section (see sst_lab.tracking.selection).

Per model x seed x sample size: train the utility and safety adapters; evaluate the utility adapter
and every candidate merge on the validation split; one ``select`` node per family (its candidates'
validation evaluations and the utility adapter's are its upstream runs); then, on the test split,
evaluate base / utility / safety and each family's chosen merge (``--adapter`` = the select node,
which the sweep resolves to the merge run it chose), and the study's compare pairs on test.
Node ids end in ``-val`` or ``-test``; test nodes of a family carry ``sweep.method = <family>``.
"""

from __future__ import annotations

from sst_lab.tracking.study import _SAFE, Node, Study, base_model_path, model_label, node_key, train_nodes


def expand_selected(study: Study) -> list[Node]:
    nodes: dict[str, Node] = {}
    sel, ev, cmp_ = study.selection, study.evaluate, study.compare

    def add(node: Node) -> str:
        node.key = node_key(node.stage, node.configs, node.args,
                            {flag: nodes[up].key for flag, up in node.upstream.items()})
        nodes.setdefault(node.id, node)
        return node.id

    methods = {m.name: m for m in study.merge.methods}
    for model in study.models:
        label, base = model_label(model), base_model_path(model)
        margs = model.args

        def evaluate(role, seed, n, split, method=None, upstream=None):
            extra = sel.validation_args if split == "validation" else sel.test_args
            args = {**ev.args, **margs.get("evaluate", {}), **extra, "split": split}
            if role == "base":
                args["model"] = base
            sid = f"-n{n}" if n is not None else ""
            mid = f"-{_SAFE.sub('_', method)}" if method else ""
            tail = "val" if split == "validation" else "test"
            return add(Node(f"evaluate-{role}{mid}-{label}{sid}-s{seed}-{tail}", "evaluate", role, label, seed, n,
                            method, list(ev.configs), args, {"adapter": upstream} if upstream else {}))

        for seed in study.seeds:
            base_eval = evaluate("base", seed, None, "test") if "base" in ev.roles else None
            for n in study.sample_sizes:
                trained, tests = {}, {"base": base_eval} if base_eval else {}
                for role, node in train_nodes(study, model, seed, n).items():
                    trained[role] = add(node)
                    if role in ev.roles:
                        tests[role] = evaluate(role, seed, node.sample_size, "test", upstream=trained[role])
                util_val = evaluate("utility", seed, n if "utility" in study.train.sample_size_roles else None,
                                    "validation", upstream=trained["utility"])
                merged_n = n if study.train.sample_size_roles else None
                sid = f"-n{merged_n}" if merged_n is not None else ""
                for family, labels in sel.families.items():
                    cand_evals = []
                    for lab in labels:
                        m = methods[lab]
                        args = {**study.merge.args, **margs.get("merge", {}), "method": m.method, **m.args}
                        mid = add(Node(f"merge-{_SAFE.sub('_', lab)}-{label}{sid}-s{seed}", "merge", "merged", label,
                                       seed, merged_n, lab, list(study.merge.configs), args,
                                       {"utility_adapter": trained["utility"], "safety_adapter": trained["safety"]}))
                        cand_evals.append(evaluate("merged", seed, merged_n, "validation", lab, mid))
                    sel_args = {"family": family, "safety_metric": sel.safety_metric,
                                "utility_metric": sel.utility_metric, "rule": sel.rule, "delta": sel.delta,
                                "budget": len(labels)}
                    if sel.fallback != "min_loss":  # the default stays out of the key: existing plans unchanged
                        sel_args["fallback"] = sel.fallback
                    if sel.constraints:
                        sel_args["constraints"] = sel.constraint_args()
                    ups = {f"candidates#{i}": e for i, e in enumerate(cand_evals)}
                    ups["reference"] = util_val
                    sel_id = add(Node(f"select-{_SAFE.sub('_', family)}-{label}{sid}-s{seed}", "select", "select",
                                      label, seed, merged_n, family, [], sel_args, ups))
                    chosen = evaluate("merged", seed, merged_n, "test", family, sel_id)
                    for crole, rrole in cmp_.pairs if cmp_ else []:
                        if crole == "merged":
                            add(Node(f"compare-merged-{_SAFE.sub('_', family)}-vs-{rrole}-{label}{sid}-s{seed}",
                                     "compare", f"merged_vs_{rrole}", label, seed, merged_n, family, [],
                                     {**cmp_.args, **margs.get("compare", {})},
                                     {"candidate": chosen, "reference": tests[rrole]}))
                for crole, rrole in cmp_.pairs if cmp_ else []:
                    if crole != "merged":
                        add(Node(f"compare-{crole}-vs-{rrole}-{label}-n{n}-s{seed}", "compare", f"{crole}_vs_{rrole}",
                                 label, seed, n, None, [], {**cmp_.args, **margs.get("compare", {})},
                                 {"candidate": tests[crole], "reference": tests[rrole]}))
    return list(nodes.values())
