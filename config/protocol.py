# The multi-seed protocol's tables (python -m state.experiment, which reads this file): the datasets, the
# tasks built from them, and what each task type adds to the recipe. A task here is one line; its data and
# split are built once under the protocol's --cache, keyed by the task's name (a changed line wants a new
# --cache). Roles: choose recipes on the `choose` tasks; the `check` ones are kept for independent
# confirmation; `zeroshot`, `combo` and `unseen` run with --tasks=all (or by name).

# name -> (file under --shared, `python -m state.data prepare` options)
DATASETS = {
    "pap": ("papalexi2021_thp1_eccite_sceptre.h5ad",
            ["--pert_col", "target_gene", "--control", "non-targeting", "--context_col", "bio_rep"]),
    "gbm": ("perturbench_devel_norman19_mcfaline23.h5ad",
            ["--pert_col", "perturbation", "--control", "control", "--context_col", "cell_type",
             "--keep", "cell_type=A172,T98G,U87MG"]),
    "kang": ("kang2018_ifnb_pbmc_muscat_counts.h5ad",
             ["--pert_col", "perturbation", "--control", "control", "--context_col", "cell_type"]),
    "norman": ("perturbench_devel_norman19_mcfaline23.h5ad",
               ["--pert_col", "perturbation", "--control", "control", "--context_col", "cell_type",
                "--keep", "cell_type=k562"]),
}
GBM_SUPPORT = "MAP2K3,MAP2K6,MAP3K21"

# what a task type (the split's --task) adds to the recipe (before it: the recipe may override them):
# combinations read their parts and start from the additive model, unseen perturbations need features and
# start from the context mean (the measured anchors of each type); few-shot adds the pseudobulk term, chosen
# over all six few-shot tasks (DE overlap up on Papalexi, pearson_delta and MAE level; it lowers DE overlap
# on zero-shot Kang, so it is not in the cpu preset). dev/LOG.md, "Science III", sessions 5-7
TASK_FLAGS = {"fewshot": "--mean_weight=10",
              "combo": "--combos=+ --anchor=additive",
              "unseen": "--pert_features=pca --missing_pert_features=zero --anchor=context_mean"}

# name -> (dataset, `python -m state.splits make` options, role)
TASKS = {
    # few-shot: Papalexi with one replicate held out but for 30% of its KOs; GBM with one cell line held out
    # but for three MAP kinases
    "pap_rep1": ("pap", ["--task", "fewshot", "--context", "rep_1", "--support", "0.3"], "choose"),
    "pap_rep2": ("pap", ["--task", "fewshot", "--context", "rep_2", "--support", "0.3"], "choose"),
    # zero-shot: Kang, IFN-beta in CD14+ Monocytes held out
    "kang_cd14": ("kang", ["--task", "zeroshot", "--context", "CD14+ Monocytes"], "choose"),
    "gbm_u87": ("gbm", ["--task", "fewshot", "--context", "U87MG", "--support_perts", GBM_SUPPORT], "choose"),
    "gbm_t98": ("gbm", ["--task", "fewshot", "--context", "T98G", "--support_perts", GBM_SUPPORT], "choose"),
    "gbm_a172": ("gbm", ["--task", "fewshot", "--context", "A172", "--support_perts", GBM_SUPPORT], "check"),
    "pap_rep3": ("pap", ["--task", "fewshot", "--context", "rep_3", "--support", "0.3"], "check"),
    # zero-shot magnitude: every other Kang cell type held out in turn
    "kang_b": ("kang", ["--task", "zeroshot", "--context", "B cells"], "zeroshot"),
    "kang_cd4": ("kang", ["--task", "zeroshot", "--context", "CD4 T cells"], "zeroshot"),
    "kang_cd8": ("kang", ["--task", "zeroshot", "--context", "CD8 T cells"], "zeroshot"),
    "kang_fcgr3a": ("kang", ["--task", "zeroshot", "--context", "FCGR3A+ Monocytes"], "zeroshot"),
    # unseen combinations: Norman19 K562 CRISPRa doubles whose two singles were measured (the additive
    # baseline joins; trained with TASK_FLAGS["combo"])
    "norman_combo": ("norman", ["--task", "combo", "--combo_sep", "+"], "combo"),
    # unseen perturbations from features: 3 Papalexi targets that are measured genes held out in every
    # replicate (trained with TASK_FLAGS["unseen"]: 16 have no gene); 2 of the other 6 with features are
    # held out of training too, for the guard to score unseen ones on
    "pap_unseen": ("pap", ["--task", "unseen", "--pert_features", "pca", "--test_perts", "IFNGR2,JAK2,STAT1",
                           "--guard_perts", "2"], "unseen"),
    # the same with the held-out perturbations drawn (seeded) among the 9 with features, not chosen as
    # the strongest: pap_unseen's three are the IFN-gamma pathway hits that dominate the context mean
    "pap_unseen_draw": ("pap", ["--task", "unseen", "--pert_features", "pca", "--test_frac", "0.34",
                                "--guard_perts", "2"], "unseen"),
}
