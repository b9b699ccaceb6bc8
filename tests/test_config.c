/* Hugging Face config.json parsing: accepted settings and every rejection. */
#include <stdlib.h>

#include "io/hf_config.h"
#include "test.h"

static const char *base_fields =
    "\"hidden_size\": 64, \"intermediate_size\": 172, \"num_hidden_layers\": 5, "
    "\"num_attention_heads\": 8, \"vocab_size\": 512";

static cp_status parse_with(const char *extra, cp_model_config *cfg, cp_error *err)
{
    /* extra comes first: cJSON returns the first of duplicate keys, so extra
     * overrides the base fields. */
    char json[2048];
    snprintf(json, sizeof json, "{\"model_type\": \"llama\", %s%s%s}", extra,
             *extra ? ", " : "", base_fields);
    return cp_config_parse(json, "config.json", cfg, err);
}

TEST(config_stories260k)
{
    cp_model_config c;
    cp_error err = {0};
    CHECK_MSG(cp_config_load(test_shared("models/stories260K/config.json"), &c, &err) == CP_OK,
              "%s", err.msg);
    CHECK_EQ_STR(c.model_type, "llama");
    CHECK_EQ_INT(c.hidden_size, 64);
    CHECK_EQ_INT(c.intermediate_size, 172);
    CHECK_EQ_INT(c.n_layers, 5);
    CHECK_EQ_INT(c.n_heads, 8);
    CHECK_EQ_INT(c.n_kv_heads, 4);
    CHECK_EQ_INT(c.head_dim, 8);
    CHECK_EQ_INT(c.vocab_size, 512);
    CHECK_EQ_INT(c.max_position_embeddings, 512);
    CHECK_EQ_INT(c.tie_word_embeddings, 1);
    CHECK_EQ_INT(c.bos_id, 1);
    CHECK_EQ_INT(c.n_eos_ids, 1);
    CHECK_EQ_INT(c.eos_ids[0], 2);
    CHECK_EQ_INT(c.sliding_window, 0);
    CHECK_EQ_INT(c.rope_scaling, CP_ROPE_SCALING_NONE);
    CHECK_CLOSE(c.rms_norm_eps, 1e-5, 1e-9);
    CHECK_CLOSE(c.rope_theta, 10000.0, 1e-9);
}

TEST(config_defaults_and_options)
{
    cp_model_config c;
    cp_error err = {0};
    CHECK(parse_with("", &c, &err) == CP_OK);
    CHECK_EQ_INT(c.n_kv_heads, 8); /* defaults to the attention heads */
    CHECK_EQ_INT(c.head_dim, 8);
    CHECK_EQ_INT(c.tie_word_embeddings, 0);

    CHECK(parse_with("\"head_dim\": 16, \"num_key_value_heads\": 2, \"sliding_window\": 4096, "
                     "\"eos_token_id\": [128001, 128008, 128009], \"vocab_size\": 128256",
                     &c, &err) == CP_OK);
    CHECK_EQ_INT(c.head_dim, 16);
    CHECK_EQ_INT(c.n_kv_heads, 2);
    CHECK_EQ_INT(c.sliding_window, 0); /* Llama has no sliding window, as in transformers */
    CHECK_EQ_INT(c.n_eos_ids, 3);
    CHECK_EQ_INT(c.eos_ids[2], 128009);

    CHECK(parse_with("\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 32.0, "
                     "\"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, "
                     "\"original_max_position_embeddings\": 8192}",
                     &c, &err) == CP_OK);
    CHECK_EQ_INT(c.rope_scaling, CP_ROPE_SCALING_LLAMA3);
    CHECK_CLOSE(c.rope_factor, 32.0, 1e-9);
    CHECK_EQ_INT(c.rope_original_max_position, 8192);

    CHECK(parse_with("\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}", &c, &err) ==
          CP_OK);
    CHECK_EQ_INT(c.rope_scaling, CP_ROPE_SCALING_LINEAR);
    CHECK(parse_with("\"rope_scaling\": null, \"sliding_window\": null", &c, &err) == CP_OK);
    CHECK_EQ_INT(c.rope_scaling, CP_ROPE_SCALING_NONE);

    CHECK(parse_with("\"attention_bias\": true, \"mlp_bias\": true", &c, &err) == CP_OK);
    CHECK_EQ_INT(c.qkv_bias, 1);
    CHECK_EQ_INT(c.o_bias, 1);
    CHECK_EQ_INT(c.mlp_bias, 1);
}

TEST(config_type_specific_settings)
{
    cp_model_config c;
    cp_error err = {0};
    const char *mistral = "{\"model_type\": \"mistral\", \"hidden_size\": 64, "
                          "\"intermediate_size\": 172, \"num_hidden_layers\": 2, "
                          "\"num_attention_heads\": 8, \"vocab_size\": 512, \"sliding_window\": 4096}";
    CHECK(cp_config_parse(mistral, "config.json", &c, &err) == CP_OK);
    CHECK_EQ_INT(c.sliding_window, 4096);
    CHECK_EQ_INT(c.qkv_bias, 0);

    /* Qwen2: q/k/v biases, and sliding_window ignored unless use_sliding_window. */
    const char *qwen2 = "{\"model_type\": \"qwen2\", \"hidden_size\": 64, "
                        "\"intermediate_size\": 172, \"num_hidden_layers\": 2, "
                        "\"num_attention_heads\": 8, \"vocab_size\": 512, "
                        "\"sliding_window\": 4096, \"use_sliding_window\": false}";
    CHECK(cp_config_parse(qwen2, "config.json", &c, &err) == CP_OK);
    CHECK_EQ_INT(c.sliding_window, 0);
    CHECK_EQ_INT(c.qkv_bias, 1);
    CHECK_EQ_INT(c.o_bias, 0);
    CHECK_EQ_INT(c.mlp_bias, 0);

    const char *windowed = "{\"model_type\": \"qwen2\", \"hidden_size\": 64, "
                           "\"intermediate_size\": 172, \"num_hidden_layers\": 2, "
                           "\"num_attention_heads\": 8, \"vocab_size\": 512, "
                           "\"use_sliding_window\": true}";
    CHECK_EQ_INT(cp_config_parse(windowed, "config.json", &c, &err), CP_ERR_INPUT);
    CHECK(strstr(err.msg, "use_sliding_window") != NULL);

    const char *negative = "{\"model_type\": \"mistral\", \"hidden_size\": 64, "
                           "\"intermediate_size\": 172, \"num_hidden_layers\": 2, "
                           "\"num_attention_heads\": 8, \"vocab_size\": 512, \"sliding_window\": -1}";
    CHECK_EQ_INT(cp_config_parse(negative, "config.json", &c, &err), CP_ERR_INPUT);
    CHECK(strstr(err.msg, "sliding_window") != NULL);
}

TEST(config_rejections)
{
    static const struct {
        const char *json;   /* a whole config.json */
        const char *needle; /* a phrase the message must contain */
    } cases[] = {
        {"{\"model_type\": \"llama\", ", "invalid JSON"},
        {"[1, 2]", "JSON object"},
        {"{\"hidden_size\": 64}", "model_type"},
        {"{\"model_type\": \"gpt_neox\"}", "\"gpt_neox\" is not supported; supported: gpt2, llama, mistral, qwen2"},
        {"{\"model_type\": \"llama\", \"hidden_size\": 64}", "\"intermediate_size\""},
        {"{\"model_type\": \"llama\", \"hidden_size\": 64.5, \"intermediate_size\": 1, "
         "\"num_hidden_layers\": 1, \"num_attention_heads\": 1, \"vocab_size\": 4}",
         "\"hidden_size\" must be an integer"},
        {"{\"model_type\": \"llama\", \"hidden_size\": \"64\", \"intermediate_size\": 1, "
         "\"num_hidden_layers\": 1, \"num_attention_heads\": 1, \"vocab_size\": 4}",
         "\"hidden_size\" must be an integer"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        cp_model_config c;
        cp_error err = {0};
        CHECK_EQ_INT(cp_config_parse(cases[i].json, "config.json", &c, &err), CP_ERR_INPUT);
        CHECK_MSG(strstr(err.msg, cases[i].needle) && strstr(err.msg, "config.json"),
                  "case %zu: \"%s\" lacks \"%s\"", i, err.msg, cases[i].needle);
    }
}

TEST(config_rejects_unsupported_settings)
{
    static const struct {
        const char *extra;
        const char *needle;
    } cases[] = {
        {"\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0}",
         "rope_scaling type \"yarn\" is not supported"},
        {"\"rope_scaling\": {\"type\": \"dynamic\", \"factor\": 2.0}", "\"dynamic\""},
        {"\"rope_scaling\": {\"factor\": 2.0}", "rope_type"},
        {"\"rope_scaling\": {\"rope_type\": \"linear\"}", "rope_scaling: missing key \"factor\""},
        {"\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0}", "low_freq_factor"},
        {"\"rope_scaling\": 3", "must be an object"},
        {"\"attention_bias\": 1", "\"attention_bias\" must be true or false"},
        {"\"hidden_act\": \"gelu\"", "hidden_act \"gelu\" is not supported"},
        {"\"num_key_value_heads\": 3", "multiple of num_key_value_heads"},
        {"\"num_key_value_heads\": 0", "must be positive"},
        {"\"num_attention_heads\": 7", "no head_dim is given"},
        {"\"head_dim\": 7", "must be even"},
        {"\"vocab_size\": -5", "\"vocab_size\" must be positive"},
        {"\"tie_word_embeddings\": \"yes\"", "true or false"},
        {"\"rms_norm_eps\": -1", "must be positive"},
        {"\"bos_token_id\": 600", "outside vocab_size"},
        {"\"eos_token_id\": [2, 9999]", "eos_token_id 9999 is outside"},
        {"\"eos_token_id\": \"2\"", "eos_token_id"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        cp_model_config c;
        cp_error err = {0};
        CHECK_EQ_INT(parse_with(cases[i].extra, &c, &err), CP_ERR_INPUT);
        CHECK_MSG(strstr(err.msg, cases[i].needle) && strstr(err.msg, "config.json"),
                  "case %zu: \"%s\" lacks \"%s\"", i, err.msg, cases[i].needle);
    }
}
