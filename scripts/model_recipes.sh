# Sourced by train_models.sh and gpu_train.sh: the options that make each learned T1 model what it ships as (its
# arch and score), apart from the training budget, which the two scripts set for their machines.
# `recipe KIND` sets RECIPE (an array of `brainanomaly train` arguments) and HALF (1: stored as float16).

# Spatial code + denoising input noise is what lifted the CAE and the DPA past the normative model (see the cards).
SPATIAL_DN='"channels": [32, 64, 128], "strides": [2, 2, 2], "latent_channels": 16, "noise_std": 0.5, "noise_res": [10, 8]'

recipe() {
    case "$1" in
        dae) RECIPE=(--patience 4); HALF=1 ;;
        cae) RECIPE=(--patience 5 --arch "{\"bottleneck\": \"spatial\", $SPATIAL_DN}"); HALF=1 ;;
        dpa) RECIPE=(--patience 5 --score perceptual+signed --arch "{\"ae\": {\"type\": \"ae_spatial\", $SPATIAL_DN}}")
             HALF=1 ;;
        # Diffusion's validation loss is noisy (random noise levels): early stopping would stop it too soon.
        ldm) RECIPE=(--patience 100); HALF=0 ;;
        *) echo "no recipe for model '$1' (dae, cae, dpa, ldm)" >&2; return 2 ;;
    esac
}
