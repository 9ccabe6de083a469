"""The engine every command calls; the commands (`ncl_fast.train`, `evaluate`,
`predict`, `ablate`, `check_data`, `synth`) only parse options.

* `config`: the training options, resolved once into a frozen `TrainConfig`;
* `loop`: the training step (micro-batches, AMP, compile, CUDA graphs), the epoch
  and the run (`run_training`);
* `evaluation`: IMDL-BenCo's metrics on test sets, every image once;
* `prediction`: probabilities of new photos and the files `predict` writes;
* `checkpoints`: loading and saving checkpoints, a model from any checkpoint;
* `records`: `log.txt` keys (built and read in one place), TensorBoard, the
  progress bar, the GPU monitor, the data-wait clock;
* `interrupts`: Ctrl-C and SIGTERM as a flag seen at the next step boundary;
* `datasets`: the synthetic set and the run's training and test entries;
* `batches`: a batch onto the device, uint8 converted and normalized there;
* `ablation`: the runs and tables of `python -m ncl_fast.ablate`.
"""
