# The few-shot recipe: the cpu preset (config/st_cpu.py) plus the pseudobulk term (the set-mean squared error,
# x10, beside the energy distance). Chosen with the multi-seed protocol over all six few-shot tasks (Papalexi
# rep_1-3, GBM U87MG/T98G/A172): DE overlap up on Papalexi, pearson_delta and MAE level; on zero-shot it lowers
# DE overlap, so zero-shot, combinations and unseen perturbations keep config/st_cpu.py (dev/LOG.md, session 7).
#     python train.py config/st_cpu_fewshot.py --data=DIR --split=fewshot.json --seed=0 --out=runs/fs

preset = "cpu"
mean_weight = 10.0
