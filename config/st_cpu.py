# The cpu preset: the recommended CPU recipe of ST, chosen with the multi-seed protocol over all its tasks
# (python -m state.experiment, README "Results"). One file, read two ways:
#     python train.py config/st_cpu.py --data=DIR --split=FILE --seed=0 --out=runs/cpu
#     python train.py --preset=cpu --data=DIR --split=FILE --seed=0 --out=runs/cpu   (state/st.py reads it)
# Every name is a train.py setting or an STConfig field; a --key=value given after the file overrides it.

preset = "cpu"

# the model (STConfig fields): tiny widened to hidden 128 and 4 layers, sets of 32, and a baseline-anchored
# output (ST predicts a correction on top of the auto baseline's shift, so it starts at the baseline)
set_size = 32
hidden = 128
n_layers = 4
n_heads = 4
ff = 256
n_enc = 2
n_dec = 2
anchor = "auto"

# training: 2,000 steps of 16 sets (2-4 min a run on one core), lr 1e-3 with warmup and cosine decay, a
# weight EMA, no control sets
lr = 1e-3
batch_size = 16
max_steps = 2000
schedule = "cosine"
warmup = 100
ema = 0.999
control_sets = False
# the weights kept: the lowest val loss on the held-out context's support perturbations; then the
# correction's strength alpha for that context chosen from this grid on the same cells (0: the anchor itself)
select = "support"
guard = "0,0.25,0.5,0.75,1"
