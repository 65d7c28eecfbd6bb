"""The discrete-time DDPM, one module per concept; ``diffusion_jax.diffusion`` lists its public
names."""
