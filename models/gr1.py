"""GR-1: the trainable network (everything but the frozen MAE and CLIP encoders).

Per timestep t the GPT-2 trunk sees one block of tokens (TokenLayout), the T blocks in time order:

    lang | state | static patch latents x Q | static cls | gripper patch latents x Q | gripper cls    (observation)
    action queries x K | static observation queries x (Q+1) | gripper observation queries x (Q+1)      (queries)

Observation tokens get the relative timestep embedding; queries do not. GPT-2's causal mask is combined with a
key-padding mask that hides padded timesteps and every query, so a query of step t reads the valid observation tokens
of steps <= t and nothing reads a query. Action queries are decoded into K-step action chunks; observation queries
are decoded (MAE-style, with mask tokens) into the patches of the frame skip_frame steps later.

Because nothing attends to a query and padded observation tokens are invisible, tokens whose outputs are not needed
can be left out of the GPT-2 input without changing any other output, provided every kept token keeps its position
id: :meth:`GR1.forward` takes ``keep`` (which queries to run) for that.

Shape letters (README "Architecture"): B batch, T window (seq_len), K action chunk, Q resampler latents, P patches per
image, D hidden (embed_dim), F MAE width, E CLIP embedding, M tokens per timestep, C p*p*3 pixels per patch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from torch import nn

from config import ModelConfig
from facts import CAMERAS, GRIPPER_STATE_CLASSES, PREDICTION_KEYS, TokenLayout
from models.layers import Block, PerceiverResampler, sincos_pos_embed_2d

__all__ = ["CAMERAS", "GR1", "Keep", "TokenLayout"]


@dataclass
class Keep:
    """Which query tokens to run through GPT-2 (observation tokens always run).

    action_steps: timesteps whose action queries run (None = all); frame_steps: timesteps whose observation queries
    run and are decoded into frames (None = all, [] = none).
    per_row: action_steps (and frame_steps, unless []) hold ONE timestep per batch row instead: row b runs the queries
    of its own timestep only (evaluation queries envs with different history lengths in one batch); the outputs then
    have one timestep per row.
    """

    action_steps: list[int] | None = None
    frame_steps: list[int] | None = None
    per_row: bool = False


def _gpt2_config(cfg: ModelConfig) -> transformers.GPT2Config:
    return transformers.GPT2Config(
        vocab_size=1, bos_token_id=None, eos_token_id=None,  # wte is never used: GR-1 passes inputs_embeds
        n_embd=cfg.embed_dim, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=4 * cfg.embed_dim,
        activation_function=cfg.activation_function, n_positions=cfg.n_positions,
        resid_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,  # GR1-Training leaves this at GPT2Config's 0.1 whatever its dropout key says
        use_cache=False,  # the reference builds and discards a KV cache on every forward
        attn_implementation="sdpa")


class GR1(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, F, Q = cfg.embed_dim, cfg.img_feat_dim, cfg.resampler_num_latents
        self.config = cfg
        self.layout = cfg.layout

        # Trunk
        self.transformer = transformers.GPT2Model(_gpt2_config(cfg))
        self.transformer.wte.requires_grad_(False)  # unused; frozen so DDP needs no find_unused_parameters
        self.perceiver_resampler = PerceiverResampler(F, cfg.resampler_depth, cfg.resampler_dim_head,
                                                      cfg.resampler_heads, Q)

        # Token embeddings (names as GR1-Training, so its checkpoints load strictly)
        self.embed_arm_state = nn.Linear(cfg.state_dim - 1, D)
        self.embed_gripper_state = nn.Linear(GRIPPER_STATE_CLASSES, D)  # one-hot gripper state
        self.embed_state = nn.Linear(2 * D, D)
        self.embed_timestep = nn.Embedding(cfg.seq_len, D)
        self.embed_lang = nn.Linear(cfg.lang_feat_dim, D)
        self.embed_hand_img = nn.Linear(F, D)
        self.embed_img = nn.Linear(F, D)
        self.embed_hand_patch = nn.Linear(F, D)
        self.embed_patch = nn.Linear(F, D)
        self.embed_ln = nn.LayerNorm(D)

        # Queries
        self.action_queries = nn.Embedding(1, D)
        self.action_chunk_queries = nn.Embedding(cfg.chunk_size, D)
        nn.init.zeros_(self.action_chunk_queries.weight)  # fine-tuned from zero, as GR1-Training
        self.obs_queries = nn.Embedding(Q + 1, D)
        self.obs_hand_queries = nn.Embedding(Q + 1, D)

        # Action head. Faithful to GR1-Training and Bytedance GR-1: no nonlinearity between the two Linear layers.
        self.pred_act_mlps = nn.ModuleList([nn.Linear(D, D // 2), nn.Linear(D // 2, D // 2)])
        self.pred_arm_act = nn.Linear(D // 2, cfg.act_dim - 1)
        self.pred_gripper_act = nn.Linear(D // 2, 1)  # logit of "open"

        # Pixel decoder (MAE decoder names), shared by both cameras
        self.decoder_embed = nn.Linear(D, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, D))
        self.decoder_blocks = nn.ModuleList([Block(D, 16, 4.0, qkv_bias=True) for _ in range(2)])
        self.decoder_norm = nn.LayerNorm(D)
        self.decoder_pred = nn.Linear(D, cfg.patch_size ** 2 * 3)
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(D, cfg.grid)[None], requires_grad=False)

    # ---- stage 1: per-frame image tokens (independent of other frames: evaluation caches them) ----
    def frame_tokens(self, cls: torch.Tensor, patches: torch.Tensor, cam: str) -> torch.Tensor:
        """MAE features of N frames of one camera -> (N, Q+1, D) tokens: resampled patch latents, then cls."""
        embed_patch, embed_img = ((self.embed_patch, self.embed_img) if cam == "static"
                                  else (self.embed_hand_patch, self.embed_hand_img))
        latents = self.perceiver_resampler(patches)  # (N, Q, F)
        return torch.cat((embed_patch(latents.float()), embed_img(cls.float())[:, None]), dim=1)

    # ---- stage 2: observation tokens of every timestep ----
    def observation_tokens(self, lang: torch.Tensor, arm_state: torch.Tensor, gripper_state: torch.Tensor,
                           frames: dict[str, torch.Tensor]) -> torch.Tensor:
        """lang (B, E), states (B, T, 6) / (B, T, 2), frames[cam] (B, T, Q+1, D) -> (B, T, n_obs, D)."""
        B, T = arm_state.shape[:2]
        time = self.embed_timestep.weight[:T]  # (T, D)
        lang_tok = self.embed_lang(lang)[:, None] + time  # (B, T, D)
        state = torch.cat((self.embed_arm_state(arm_state), self.embed_gripper_state(gripper_state)), dim=-1)
        state_tok = self.embed_state(state) + time  # (B, T, D)
        frame_toks = [frames[cam] + time[:, None] for cam in CAMERAS]  # (B, T, Q+1, D) each
        return torch.cat([lang_tok[:, :, None], state_tok[:, :, None], *frame_toks], dim=2)

    def query_tokens(self) -> torch.Tensor:
        """(K + 2(Q+1), D): action chunk queries, static and gripper observation queries."""
        actions = self.action_chunk_queries.weight + self.action_queries.weight  # (K, D)
        return torch.cat((actions, self.obs_queries.weight, self.obs_hand_queries.weight))

    # ---- stage 3: trunk ----
    def _kept_positions(self, T: int, keep: Keep, device: torch.device) -> torch.Tensor:
        """Indices into the flattened (T * M) token sequence that go through GPT-2, in sequence order: (n,), or
        (B, n) with keep.per_row (every row keeps the same number of tokens)."""
        if keep.per_row:
            frames = keep.frame_steps or [None] * len(keep.action_steps)
            return torch.stack([self._kept_positions(T, Keep([a], [] if f is None else [f]), device)
                                for a, f in zip(keep.action_steps, frames)])
        layout, M = self.layout, self.layout.per_step
        keep_grid = torch.zeros(T, M, dtype=torch.bool)
        keep_grid[:, :layout.n_obs] = True
        act_steps = range(T) if keep.action_steps is None else keep.action_steps
        frame_steps = range(T) if keep.frame_steps is None else keep.frame_steps
        for t in act_steps:
            keep_grid[t, layout.action_queries] = True
        for t in frame_steps:
            for cam in CAMERAS:
                keep_grid[t, layout.obs_queries(cam)] = True
        return keep_grid.flatten().nonzero()[:, 0].to(device)

    def run_trunk(self, obs: torch.Tensor, attention_mask: torch.Tensor, keep: Keep) -> torch.Tensor:
        """obs (B, T, n_obs, D), attention_mask (B, T) -> hidden states (B, T, M, D) (unkept tokens are zero)."""
        B, T, _, D = obs.shape
        M = self.layout.per_step
        queries = self.query_tokens().expand(B, T, -1, -1)
        tokens = self.embed_ln(torch.cat((obs, queries), dim=2).reshape(B, T * M, D))  # LayerNorm is per token
        visible = torch.zeros(B, T, M, dtype=attention_mask.dtype, device=obs.device)
        visible[:, :, :self.layout.n_obs] = attention_mask[:, :, None]  # queries are never visible
        visible = visible.reshape(B, T * M)
        full = keep.action_steps is None and keep.frame_steps is None
        if full:
            hidden = self.transformer(inputs_embeds=tokens, attention_mask=visible).last_hidden_state
            return hidden.reshape(B, T, M, D)
        pos = self._kept_positions(T, keep, obs.device)
        if keep.per_row:  # each row its own kept tokens, with their own position ids
            rows = torch.arange(B, device=obs.device)[:, None]
            hidden = self.transformer(inputs_embeds=tokens[rows, pos], attention_mask=visible[rows, pos],
                                      position_ids=pos).last_hidden_state
            out = hidden.new_zeros(B, T * M, D)
            out[rows, pos] = hidden
            return out.reshape(B, T, M, D)
        hidden = self.transformer(inputs_embeds=tokens[:, pos], attention_mask=visible[:, pos],
                                  position_ids=pos[None].expand(B, -1)).last_hidden_state
        out = hidden.new_zeros(B, T * M, D)
        out[:, pos] = hidden
        return out.reshape(B, T, M, D)

    # ---- stage 4: heads ----
    def decode_actions(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., K, D) action-query outputs -> arm actions (..., K, 6), gripper logits (..., K, 1)."""
        x = hidden
        for layer in self.pred_act_mlps:
            x = layer(x)
        return self.pred_arm_act(x), self.pred_gripper_act(x)

    def decode_frames(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T', Q+1, D) observation-query outputs -> predicted patches (B, T', P, C)."""
        B, T = hidden.shape[:2]
        mask_tokens = (self.mask_token + self.decoder_pos_embed[:, None]).expand(B, T, -1, -1)  # (B, T', P, D)
        x = torch.cat((self.decoder_embed(hidden), mask_tokens), dim=2).flatten(0, 1)  # (B T', Q+1+P, D)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))[:, self.layout.frame:]  # drop the query outputs
        return x.reshape(B, T, -1, x.shape[-1])

    def forward(self, lang: torch.Tensor, arm_state: torch.Tensor, gripper_state: torch.Tensor,
                features: dict[str, tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor,
                keep: Keep | None = None, frame_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Predictions from frozen-encoder features (the training path; DDP wraps this call).

        lang (B, E) normalised CLIP embedding; arm_state (B, T, 6); gripper_state (B, T, 2) one-hot;
        features[cam] = MAE (cls (B, T, F), patches (B, T, P, F)); attention_mask (B, T) 1 for valid timesteps.
        With frame_index (B, T) long (frame sharing), features[cam] = (cls (N, F), patches (N, P, F)) of N distinct
        frames, window b's frame t being frame frame_index[b, t]: each distinct frame is resampled once.
        See predict() for the outputs.
        """
        B, T = arm_state.shape[:2]
        frames = {}
        for cam, (cls, patches) in features.items():
            if frame_index is not None:
                frames[cam] = self.frame_tokens(cls, patches, cam)[frame_index]  # (B, T, Q+1, D)
                continue
            tokens = self.frame_tokens(cls.flatten(0, 1), patches.flatten(0, 1), cam)  # (B T, Q+1, D)
            frames[cam] = tokens.unflatten(0, (B, T))
        return self.predict(lang, arm_state, gripper_state, frames, attention_mask, keep)

    def predict(self, lang: torch.Tensor, arm_state: torch.Tensor, gripper_state: torch.Tensor,
                frames: dict[str, torch.Tensor], attention_mask: torch.Tensor,
                keep: Keep | None = None) -> dict[str, torch.Tensor]:
        """Predictions from per-frame tokens (frames[cam] (B, T, Q+1, D) from frame_tokens; evaluation caches them).

        Returns arm_action (B, Ta, K, 6), gripper_action (B, Ta, K, 1) logits for the timesteps of
        keep.action_steps, and rgb_static_pred / rgb_gripper_pred (B, Tf, P, C) for keep.frame_steps
        (Ta = Tf = 1 with keep.per_row).
        """
        keep = keep or Keep()
        B, T = arm_state.shape[:2]
        hidden = self.run_trunk(self.observation_tokens(lang, arm_state, gripper_state, frames), attention_mask,
                                keep)  # (B, T, M, D)
        layout = self.layout

        def at(steps: list[int], tokens: slice) -> torch.Tensor:  # (B, len(steps), n, D); per row (B, 1, n, D)
            return hidden[torch.arange(B), steps, tokens][:, None] if keep.per_row else hidden[:, steps, tokens]

        act_steps = list(range(T)) if keep.action_steps is None else keep.action_steps
        frame_steps = list(range(T)) if keep.frame_steps is None else keep.frame_steps
        arm, gripper = self.decode_actions(at(act_steps, layout.action_queries))
        out = {"arm_action": arm, "gripper_action": gripper}
        if frame_steps:
            for cam in CAMERAS:
                out[PREDICTION_KEYS[cam]] = self.decode_frames(at(frame_steps, layout.obs_queries(cam)))
        return out
