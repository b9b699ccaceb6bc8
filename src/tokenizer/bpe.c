/*
 * Byte-level BPE as in GPT-2. It contains the byte-to-unicode table that
 * vocab files use for raw bytes, hand-written matchers for the pre-tokenizer
 * regexes of GPT-2, Llama-3 and Qwen2 (no regex library), and rank-ordered
 * merges with a binary heap, which take O(n log n) per pre-token. It also
 * loads tokenizer.json and vocab.json + merges.txt.
 *
 * NOTE: letters and numbers come from a table of the general categories L*
 * and N* in Unicode 14.0, complete for that version; characters added later
 * count as punctuation. There is no cache, so every pre-token is merged anew.
 */
#include "tokenizer/bpe.h"

#include <cJSON.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"

/* A sanity limit far above real vocabularies (GPT-2 has 50,257 tokens), so
 * that ids, offsets and hash table sizes cannot overflow. */
#define MAX_TOKENS (1 << 24)

/* ---------------------------------------------------------------------- */
/* GPT-2's byte-to-unicode table                                          */
/* ---------------------------------------------------------------------- */

/* Vocab files write each raw byte as one code point: the printable bytes
 * '!'..'~', 0xA1..0xAC and 0xAE..0xFF map to themselves, and the other 68
 * bytes become U+0100, U+0101, ... in byte order (so ' ' is U+0120 "Ġ"). */
#define BYTE_CODE_POINTS 324 /* every code point the table uses is below this */

static bool byte_is_printable(int b)
{
    return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

/* Fills byte_of[cp] with the raw byte that code point cp encodes, or -1. */
static void build_byte_table(int16_t byte_of[BYTE_CODE_POINTS])
{
    for (int cp = 0; cp < BYTE_CODE_POINTS; cp++)
        byte_of[cp] = -1;
    int next = 256;
    for (int b = 0; b < 256; b++)
        byte_of[byte_is_printable(b) ? b : next++] = (int16_t)b;
}

/* ---------------------------------------------------------------------- */
/* UTF-8 and Unicode classes                                              */
/* ---------------------------------------------------------------------- */

/* Decodes the character at text[pos] into *cp and returns its length in
 * bytes. An invalid or truncated sequence is one byte with *cp = -1. */
static size_t utf8_decode(const char *text, size_t len, size_t pos, int32_t *cp)
{
    const uint8_t *s = (const uint8_t *)text + pos;
    size_t left = len - pos;
    uint8_t c = s[0];
    size_t n = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3
               : (c & 0xF8) == 0xF0                ? 4
                                                   : 0;
    *cp = -1;
    if (n == 1) {
        *cp = c;
        return 1;
    }
    if (n == 0 || n > left)
        return 1;
    int32_t v = c & (0x7F >> n);
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 1;
        v = (v << 6) | (s[i] & 0x3F);
    }
    static const int32_t min_for_len[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (v < min_for_len[n] || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
        return 1;
    *cp = v;
    return n;
}

typedef struct cp_bpe_range {
    int32_t first, last;
} cp_bpe_range;

/* Generated with Python 3's unicodedata (Unicode 14.0.0): every code point
 * from U+0080 up whose general category starts with L (letter_ranges) or N
 * (number_ranges), merged into inclusive ranges. */
static const cp_bpe_range letter_ranges[] = {
    {0x000AA, 0x000AA}, {0x000B5, 0x000B5}, {0x000BA, 0x000BA}, {0x000C0, 0x000D6}, {0x000D8, 0x000F6},
    {0x000F8, 0x002C1}, {0x002C6, 0x002D1}, {0x002E0, 0x002E4}, {0x002EC, 0x002EC}, {0x002EE, 0x002EE},
    {0x00370, 0x00374}, {0x00376, 0x00377}, {0x0037A, 0x0037D}, {0x0037F, 0x0037F}, {0x00386, 0x00386},
    {0x00388, 0x0038A}, {0x0038C, 0x0038C}, {0x0038E, 0x003A1}, {0x003A3, 0x003F5}, {0x003F7, 0x00481},
    {0x0048A, 0x0052F}, {0x00531, 0x00556}, {0x00559, 0x00559}, {0x00560, 0x00588}, {0x005D0, 0x005EA},
    {0x005EF, 0x005F2}, {0x00620, 0x0064A}, {0x0066E, 0x0066F}, {0x00671, 0x006D3}, {0x006D5, 0x006D5},
    {0x006E5, 0x006E6}, {0x006EE, 0x006EF}, {0x006FA, 0x006FC}, {0x006FF, 0x006FF}, {0x00710, 0x00710},
    {0x00712, 0x0072F}, {0x0074D, 0x007A5}, {0x007B1, 0x007B1}, {0x007CA, 0x007EA}, {0x007F4, 0x007F5},
    {0x007FA, 0x007FA}, {0x00800, 0x00815}, {0x0081A, 0x0081A}, {0x00824, 0x00824}, {0x00828, 0x00828},
    {0x00840, 0x00858}, {0x00860, 0x0086A}, {0x00870, 0x00887}, {0x00889, 0x0088E}, {0x008A0, 0x008C9},
    {0x00904, 0x00939}, {0x0093D, 0x0093D}, {0x00950, 0x00950}, {0x00958, 0x00961}, {0x00971, 0x00980},
    {0x00985, 0x0098C}, {0x0098F, 0x00990}, {0x00993, 0x009A8}, {0x009AA, 0x009B0}, {0x009B2, 0x009B2},
    {0x009B6, 0x009B9}, {0x009BD, 0x009BD}, {0x009CE, 0x009CE}, {0x009DC, 0x009DD}, {0x009DF, 0x009E1},
    {0x009F0, 0x009F1}, {0x009FC, 0x009FC}, {0x00A05, 0x00A0A}, {0x00A0F, 0x00A10}, {0x00A13, 0x00A28},
    {0x00A2A, 0x00A30}, {0x00A32, 0x00A33}, {0x00A35, 0x00A36}, {0x00A38, 0x00A39}, {0x00A59, 0x00A5C},
    {0x00A5E, 0x00A5E}, {0x00A72, 0x00A74}, {0x00A85, 0x00A8D}, {0x00A8F, 0x00A91}, {0x00A93, 0x00AA8},
    {0x00AAA, 0x00AB0}, {0x00AB2, 0x00AB3}, {0x00AB5, 0x00AB9}, {0x00ABD, 0x00ABD}, {0x00AD0, 0x00AD0},
    {0x00AE0, 0x00AE1}, {0x00AF9, 0x00AF9}, {0x00B05, 0x00B0C}, {0x00B0F, 0x00B10}, {0x00B13, 0x00B28},
    {0x00B2A, 0x00B30}, {0x00B32, 0x00B33}, {0x00B35, 0x00B39}, {0x00B3D, 0x00B3D}, {0x00B5C, 0x00B5D},
    {0x00B5F, 0x00B61}, {0x00B71, 0x00B71}, {0x00B83, 0x00B83}, {0x00B85, 0x00B8A}, {0x00B8E, 0x00B90},
    {0x00B92, 0x00B95}, {0x00B99, 0x00B9A}, {0x00B9C, 0x00B9C}, {0x00B9E, 0x00B9F}, {0x00BA3, 0x00BA4},
    {0x00BA8, 0x00BAA}, {0x00BAE, 0x00BB9}, {0x00BD0, 0x00BD0}, {0x00C05, 0x00C0C}, {0x00C0E, 0x00C10},
    {0x00C12, 0x00C28}, {0x00C2A, 0x00C39}, {0x00C3D, 0x00C3D}, {0x00C58, 0x00C5A}, {0x00C5D, 0x00C5D},
    {0x00C60, 0x00C61}, {0x00C80, 0x00C80}, {0x00C85, 0x00C8C}, {0x00C8E, 0x00C90}, {0x00C92, 0x00CA8},
    {0x00CAA, 0x00CB3}, {0x00CB5, 0x00CB9}, {0x00CBD, 0x00CBD}, {0x00CDD, 0x00CDE}, {0x00CE0, 0x00CE1},
    {0x00CF1, 0x00CF2}, {0x00D04, 0x00D0C}, {0x00D0E, 0x00D10}, {0x00D12, 0x00D3A}, {0x00D3D, 0x00D3D},
    {0x00D4E, 0x00D4E}, {0x00D54, 0x00D56}, {0x00D5F, 0x00D61}, {0x00D7A, 0x00D7F}, {0x00D85, 0x00D96},
    {0x00D9A, 0x00DB1}, {0x00DB3, 0x00DBB}, {0x00DBD, 0x00DBD}, {0x00DC0, 0x00DC6}, {0x00E01, 0x00E30},
    {0x00E32, 0x00E33}, {0x00E40, 0x00E46}, {0x00E81, 0x00E82}, {0x00E84, 0x00E84}, {0x00E86, 0x00E8A},
    {0x00E8C, 0x00EA3}, {0x00EA5, 0x00EA5}, {0x00EA7, 0x00EB0}, {0x00EB2, 0x00EB3}, {0x00EBD, 0x00EBD},
    {0x00EC0, 0x00EC4}, {0x00EC6, 0x00EC6}, {0x00EDC, 0x00EDF}, {0x00F00, 0x00F00}, {0x00F40, 0x00F47},
    {0x00F49, 0x00F6C}, {0x00F88, 0x00F8C}, {0x01000, 0x0102A}, {0x0103F, 0x0103F}, {0x01050, 0x01055},
    {0x0105A, 0x0105D}, {0x01061, 0x01061}, {0x01065, 0x01066}, {0x0106E, 0x01070}, {0x01075, 0x01081},
    {0x0108E, 0x0108E}, {0x010A0, 0x010C5}, {0x010C7, 0x010C7}, {0x010CD, 0x010CD}, {0x010D0, 0x010FA},
    {0x010FC, 0x01248}, {0x0124A, 0x0124D}, {0x01250, 0x01256}, {0x01258, 0x01258}, {0x0125A, 0x0125D},
    {0x01260, 0x01288}, {0x0128A, 0x0128D}, {0x01290, 0x012B0}, {0x012B2, 0x012B5}, {0x012B8, 0x012BE},
    {0x012C0, 0x012C0}, {0x012C2, 0x012C5}, {0x012C8, 0x012D6}, {0x012D8, 0x01310}, {0x01312, 0x01315},
    {0x01318, 0x0135A}, {0x01380, 0x0138F}, {0x013A0, 0x013F5}, {0x013F8, 0x013FD}, {0x01401, 0x0166C},
    {0x0166F, 0x0167F}, {0x01681, 0x0169A}, {0x016A0, 0x016EA}, {0x016F1, 0x016F8}, {0x01700, 0x01711},
    {0x0171F, 0x01731}, {0x01740, 0x01751}, {0x01760, 0x0176C}, {0x0176E, 0x01770}, {0x01780, 0x017B3},
    {0x017D7, 0x017D7}, {0x017DC, 0x017DC}, {0x01820, 0x01878}, {0x01880, 0x01884}, {0x01887, 0x018A8},
    {0x018AA, 0x018AA}, {0x018B0, 0x018F5}, {0x01900, 0x0191E}, {0x01950, 0x0196D}, {0x01970, 0x01974},
    {0x01980, 0x019AB}, {0x019B0, 0x019C9}, {0x01A00, 0x01A16}, {0x01A20, 0x01A54}, {0x01AA7, 0x01AA7},
    {0x01B05, 0x01B33}, {0x01B45, 0x01B4C}, {0x01B83, 0x01BA0}, {0x01BAE, 0x01BAF}, {0x01BBA, 0x01BE5},
    {0x01C00, 0x01C23}, {0x01C4D, 0x01C4F}, {0x01C5A, 0x01C7D}, {0x01C80, 0x01C88}, {0x01C90, 0x01CBA},
    {0x01CBD, 0x01CBF}, {0x01CE9, 0x01CEC}, {0x01CEE, 0x01CF3}, {0x01CF5, 0x01CF6}, {0x01CFA, 0x01CFA},
    {0x01D00, 0x01DBF}, {0x01E00, 0x01F15}, {0x01F18, 0x01F1D}, {0x01F20, 0x01F45}, {0x01F48, 0x01F4D},
    {0x01F50, 0x01F57}, {0x01F59, 0x01F59}, {0x01F5B, 0x01F5B}, {0x01F5D, 0x01F5D}, {0x01F5F, 0x01F7D},
    {0x01F80, 0x01FB4}, {0x01FB6, 0x01FBC}, {0x01FBE, 0x01FBE}, {0x01FC2, 0x01FC4}, {0x01FC6, 0x01FCC},
    {0x01FD0, 0x01FD3}, {0x01FD6, 0x01FDB}, {0x01FE0, 0x01FEC}, {0x01FF2, 0x01FF4}, {0x01FF6, 0x01FFC},
    {0x02071, 0x02071}, {0x0207F, 0x0207F}, {0x02090, 0x0209C}, {0x02102, 0x02102}, {0x02107, 0x02107},
    {0x0210A, 0x02113}, {0x02115, 0x02115}, {0x02119, 0x0211D}, {0x02124, 0x02124}, {0x02126, 0x02126},
    {0x02128, 0x02128}, {0x0212A, 0x0212D}, {0x0212F, 0x02139}, {0x0213C, 0x0213F}, {0x02145, 0x02149},
    {0x0214E, 0x0214E}, {0x02183, 0x02184}, {0x02C00, 0x02CE4}, {0x02CEB, 0x02CEE}, {0x02CF2, 0x02CF3},
    {0x02D00, 0x02D25}, {0x02D27, 0x02D27}, {0x02D2D, 0x02D2D}, {0x02D30, 0x02D67}, {0x02D6F, 0x02D6F},
    {0x02D80, 0x02D96}, {0x02DA0, 0x02DA6}, {0x02DA8, 0x02DAE}, {0x02DB0, 0x02DB6}, {0x02DB8, 0x02DBE},
    {0x02DC0, 0x02DC6}, {0x02DC8, 0x02DCE}, {0x02DD0, 0x02DD6}, {0x02DD8, 0x02DDE}, {0x02E2F, 0x02E2F},
    {0x03005, 0x03006}, {0x03031, 0x03035}, {0x0303B, 0x0303C}, {0x03041, 0x03096}, {0x0309D, 0x0309F},
    {0x030A1, 0x030FA}, {0x030FC, 0x030FF}, {0x03105, 0x0312F}, {0x03131, 0x0318E}, {0x031A0, 0x031BF},
    {0x031F0, 0x031FF}, {0x03400, 0x04DBF}, {0x04E00, 0x0A48C}, {0x0A4D0, 0x0A4FD}, {0x0A500, 0x0A60C},
    {0x0A610, 0x0A61F}, {0x0A62A, 0x0A62B}, {0x0A640, 0x0A66E}, {0x0A67F, 0x0A69D}, {0x0A6A0, 0x0A6E5},
    {0x0A717, 0x0A71F}, {0x0A722, 0x0A788}, {0x0A78B, 0x0A7CA}, {0x0A7D0, 0x0A7D1}, {0x0A7D3, 0x0A7D3},
    {0x0A7D5, 0x0A7D9}, {0x0A7F2, 0x0A801}, {0x0A803, 0x0A805}, {0x0A807, 0x0A80A}, {0x0A80C, 0x0A822},
    {0x0A840, 0x0A873}, {0x0A882, 0x0A8B3}, {0x0A8F2, 0x0A8F7}, {0x0A8FB, 0x0A8FB}, {0x0A8FD, 0x0A8FE},
    {0x0A90A, 0x0A925}, {0x0A930, 0x0A946}, {0x0A960, 0x0A97C}, {0x0A984, 0x0A9B2}, {0x0A9CF, 0x0A9CF},
    {0x0A9E0, 0x0A9E4}, {0x0A9E6, 0x0A9EF}, {0x0A9FA, 0x0A9FE}, {0x0AA00, 0x0AA28}, {0x0AA40, 0x0AA42},
    {0x0AA44, 0x0AA4B}, {0x0AA60, 0x0AA76}, {0x0AA7A, 0x0AA7A}, {0x0AA7E, 0x0AAAF}, {0x0AAB1, 0x0AAB1},
    {0x0AAB5, 0x0AAB6}, {0x0AAB9, 0x0AABD}, {0x0AAC0, 0x0AAC0}, {0x0AAC2, 0x0AAC2}, {0x0AADB, 0x0AADD},
    {0x0AAE0, 0x0AAEA}, {0x0AAF2, 0x0AAF4}, {0x0AB01, 0x0AB06}, {0x0AB09, 0x0AB0E}, {0x0AB11, 0x0AB16},
    {0x0AB20, 0x0AB26}, {0x0AB28, 0x0AB2E}, {0x0AB30, 0x0AB5A}, {0x0AB5C, 0x0AB69}, {0x0AB70, 0x0ABE2},
    {0x0AC00, 0x0D7A3}, {0x0D7B0, 0x0D7C6}, {0x0D7CB, 0x0D7FB}, {0x0F900, 0x0FA6D}, {0x0FA70, 0x0FAD9},
    {0x0FB00, 0x0FB06}, {0x0FB13, 0x0FB17}, {0x0FB1D, 0x0FB1D}, {0x0FB1F, 0x0FB28}, {0x0FB2A, 0x0FB36},
    {0x0FB38, 0x0FB3C}, {0x0FB3E, 0x0FB3E}, {0x0FB40, 0x0FB41}, {0x0FB43, 0x0FB44}, {0x0FB46, 0x0FBB1},
    {0x0FBD3, 0x0FD3D}, {0x0FD50, 0x0FD8F}, {0x0FD92, 0x0FDC7}, {0x0FDF0, 0x0FDFB}, {0x0FE70, 0x0FE74},
    {0x0FE76, 0x0FEFC}, {0x0FF21, 0x0FF3A}, {0x0FF41, 0x0FF5A}, {0x0FF66, 0x0FFBE}, {0x0FFC2, 0x0FFC7},
    {0x0FFCA, 0x0FFCF}, {0x0FFD2, 0x0FFD7}, {0x0FFDA, 0x0FFDC}, {0x10000, 0x1000B}, {0x1000D, 0x10026},
    {0x10028, 0x1003A}, {0x1003C, 0x1003D}, {0x1003F, 0x1004D}, {0x10050, 0x1005D}, {0x10080, 0x100FA},
    {0x10280, 0x1029C}, {0x102A0, 0x102D0}, {0x10300, 0x1031F}, {0x1032D, 0x10340}, {0x10342, 0x10349},
    {0x10350, 0x10375}, {0x10380, 0x1039D}, {0x103A0, 0x103C3}, {0x103C8, 0x103CF}, {0x10400, 0x1049D},
    {0x104B0, 0x104D3}, {0x104D8, 0x104FB}, {0x10500, 0x10527}, {0x10530, 0x10563}, {0x10570, 0x1057A},
    {0x1057C, 0x1058A}, {0x1058C, 0x10592}, {0x10594, 0x10595}, {0x10597, 0x105A1}, {0x105A3, 0x105B1},
    {0x105B3, 0x105B9}, {0x105BB, 0x105BC}, {0x10600, 0x10736}, {0x10740, 0x10755}, {0x10760, 0x10767},
    {0x10780, 0x10785}, {0x10787, 0x107B0}, {0x107B2, 0x107BA}, {0x10800, 0x10805}, {0x10808, 0x10808},
    {0x1080A, 0x10835}, {0x10837, 0x10838}, {0x1083C, 0x1083C}, {0x1083F, 0x10855}, {0x10860, 0x10876},
    {0x10880, 0x1089E}, {0x108E0, 0x108F2}, {0x108F4, 0x108F5}, {0x10900, 0x10915}, {0x10920, 0x10939},
    {0x10980, 0x109B7}, {0x109BE, 0x109BF}, {0x10A00, 0x10A00}, {0x10A10, 0x10A13}, {0x10A15, 0x10A17},
    {0x10A19, 0x10A35}, {0x10A60, 0x10A7C}, {0x10A80, 0x10A9C}, {0x10AC0, 0x10AC7}, {0x10AC9, 0x10AE4},
    {0x10B00, 0x10B35}, {0x10B40, 0x10B55}, {0x10B60, 0x10B72}, {0x10B80, 0x10B91}, {0x10C00, 0x10C48},
    {0x10C80, 0x10CB2}, {0x10CC0, 0x10CF2}, {0x10D00, 0x10D23}, {0x10E80, 0x10EA9}, {0x10EB0, 0x10EB1},
    {0x10F00, 0x10F1C}, {0x10F27, 0x10F27}, {0x10F30, 0x10F45}, {0x10F70, 0x10F81}, {0x10FB0, 0x10FC4},
    {0x10FE0, 0x10FF6}, {0x11003, 0x11037}, {0x11071, 0x11072}, {0x11075, 0x11075}, {0x11083, 0x110AF},
    {0x110D0, 0x110E8}, {0x11103, 0x11126}, {0x11144, 0x11144}, {0x11147, 0x11147}, {0x11150, 0x11172},
    {0x11176, 0x11176}, {0x11183, 0x111B2}, {0x111C1, 0x111C4}, {0x111DA, 0x111DA}, {0x111DC, 0x111DC},
    {0x11200, 0x11211}, {0x11213, 0x1122B}, {0x11280, 0x11286}, {0x11288, 0x11288}, {0x1128A, 0x1128D},
    {0x1128F, 0x1129D}, {0x1129F, 0x112A8}, {0x112B0, 0x112DE}, {0x11305, 0x1130C}, {0x1130F, 0x11310},
    {0x11313, 0x11328}, {0x1132A, 0x11330}, {0x11332, 0x11333}, {0x11335, 0x11339}, {0x1133D, 0x1133D},
    {0x11350, 0x11350}, {0x1135D, 0x11361}, {0x11400, 0x11434}, {0x11447, 0x1144A}, {0x1145F, 0x11461},
    {0x11480, 0x114AF}, {0x114C4, 0x114C5}, {0x114C7, 0x114C7}, {0x11580, 0x115AE}, {0x115D8, 0x115DB},
    {0x11600, 0x1162F}, {0x11644, 0x11644}, {0x11680, 0x116AA}, {0x116B8, 0x116B8}, {0x11700, 0x1171A},
    {0x11740, 0x11746}, {0x11800, 0x1182B}, {0x118A0, 0x118DF}, {0x118FF, 0x11906}, {0x11909, 0x11909},
    {0x1190C, 0x11913}, {0x11915, 0x11916}, {0x11918, 0x1192F}, {0x1193F, 0x1193F}, {0x11941, 0x11941},
    {0x119A0, 0x119A7}, {0x119AA, 0x119D0}, {0x119E1, 0x119E1}, {0x119E3, 0x119E3}, {0x11A00, 0x11A00},
    {0x11A0B, 0x11A32}, {0x11A3A, 0x11A3A}, {0x11A50, 0x11A50}, {0x11A5C, 0x11A89}, {0x11A9D, 0x11A9D},
    {0x11AB0, 0x11AF8}, {0x11C00, 0x11C08}, {0x11C0A, 0x11C2E}, {0x11C40, 0x11C40}, {0x11C72, 0x11C8F},
    {0x11D00, 0x11D06}, {0x11D08, 0x11D09}, {0x11D0B, 0x11D30}, {0x11D46, 0x11D46}, {0x11D60, 0x11D65},
    {0x11D67, 0x11D68}, {0x11D6A, 0x11D89}, {0x11D98, 0x11D98}, {0x11EE0, 0x11EF2}, {0x11FB0, 0x11FB0},
    {0x12000, 0x12399}, {0x12480, 0x12543}, {0x12F90, 0x12FF0}, {0x13000, 0x1342E}, {0x14400, 0x14646},
    {0x16800, 0x16A38}, {0x16A40, 0x16A5E}, {0x16A70, 0x16ABE}, {0x16AD0, 0x16AED}, {0x16B00, 0x16B2F},
    {0x16B40, 0x16B43}, {0x16B63, 0x16B77}, {0x16B7D, 0x16B8F}, {0x16E40, 0x16E7F}, {0x16F00, 0x16F4A},
    {0x16F50, 0x16F50}, {0x16F93, 0x16F9F}, {0x16FE0, 0x16FE1}, {0x16FE3, 0x16FE3}, {0x17000, 0x187F7},
    {0x18800, 0x18CD5}, {0x18D00, 0x18D08}, {0x1AFF0, 0x1AFF3}, {0x1AFF5, 0x1AFFB}, {0x1AFFD, 0x1AFFE},
    {0x1B000, 0x1B122}, {0x1B150, 0x1B152}, {0x1B164, 0x1B167}, {0x1B170, 0x1B2FB}, {0x1BC00, 0x1BC6A},
    {0x1BC70, 0x1BC7C}, {0x1BC80, 0x1BC88}, {0x1BC90, 0x1BC99}, {0x1D400, 0x1D454}, {0x1D456, 0x1D49C},
    {0x1D49E, 0x1D49F}, {0x1D4A2, 0x1D4A2}, {0x1D4A5, 0x1D4A6}, {0x1D4A9, 0x1D4AC}, {0x1D4AE, 0x1D4B9},
    {0x1D4BB, 0x1D4BB}, {0x1D4BD, 0x1D4C3}, {0x1D4C5, 0x1D505}, {0x1D507, 0x1D50A}, {0x1D50D, 0x1D514},
    {0x1D516, 0x1D51C}, {0x1D51E, 0x1D539}, {0x1D53B, 0x1D53E}, {0x1D540, 0x1D544}, {0x1D546, 0x1D546},
    {0x1D54A, 0x1D550}, {0x1D552, 0x1D6A5}, {0x1D6A8, 0x1D6C0}, {0x1D6C2, 0x1D6DA}, {0x1D6DC, 0x1D6FA},
    {0x1D6FC, 0x1D714}, {0x1D716, 0x1D734}, {0x1D736, 0x1D74E}, {0x1D750, 0x1D76E}, {0x1D770, 0x1D788},
    {0x1D78A, 0x1D7A8}, {0x1D7AA, 0x1D7C2}, {0x1D7C4, 0x1D7CB}, {0x1DF00, 0x1DF1E}, {0x1E100, 0x1E12C},
    {0x1E137, 0x1E13D}, {0x1E14E, 0x1E14E}, {0x1E290, 0x1E2AD}, {0x1E2C0, 0x1E2EB}, {0x1E7E0, 0x1E7E6},
    {0x1E7E8, 0x1E7EB}, {0x1E7ED, 0x1E7EE}, {0x1E7F0, 0x1E7FE}, {0x1E800, 0x1E8C4}, {0x1E900, 0x1E943},
    {0x1E94B, 0x1E94B}, {0x1EE00, 0x1EE03}, {0x1EE05, 0x1EE1F}, {0x1EE21, 0x1EE22}, {0x1EE24, 0x1EE24},
    {0x1EE27, 0x1EE27}, {0x1EE29, 0x1EE32}, {0x1EE34, 0x1EE37}, {0x1EE39, 0x1EE39}, {0x1EE3B, 0x1EE3B},
    {0x1EE42, 0x1EE42}, {0x1EE47, 0x1EE47}, {0x1EE49, 0x1EE49}, {0x1EE4B, 0x1EE4B}, {0x1EE4D, 0x1EE4F},
    {0x1EE51, 0x1EE52}, {0x1EE54, 0x1EE54}, {0x1EE57, 0x1EE57}, {0x1EE59, 0x1EE59}, {0x1EE5B, 0x1EE5B},
    {0x1EE5D, 0x1EE5D}, {0x1EE5F, 0x1EE5F}, {0x1EE61, 0x1EE62}, {0x1EE64, 0x1EE64}, {0x1EE67, 0x1EE6A},
    {0x1EE6C, 0x1EE72}, {0x1EE74, 0x1EE77}, {0x1EE79, 0x1EE7C}, {0x1EE7E, 0x1EE7E}, {0x1EE80, 0x1EE89},
    {0x1EE8B, 0x1EE9B}, {0x1EEA1, 0x1EEA3}, {0x1EEA5, 0x1EEA9}, {0x1EEAB, 0x1EEBB}, {0x20000, 0x2A6DF},
    {0x2A700, 0x2B738}, {0x2B740, 0x2B81D}, {0x2B820, 0x2CEA1}, {0x2CEB0, 0x2EBE0}, {0x2F800, 0x2FA1D},
    {0x30000, 0x3134A},
};

static const cp_bpe_range number_ranges[] = {
    {0x000B2, 0x000B3}, {0x000B9, 0x000B9}, {0x000BC, 0x000BE}, {0x00660, 0x00669}, {0x006F0, 0x006F9},
    {0x007C0, 0x007C9}, {0x00966, 0x0096F}, {0x009E6, 0x009EF}, {0x009F4, 0x009F9}, {0x00A66, 0x00A6F},
    {0x00AE6, 0x00AEF}, {0x00B66, 0x00B6F}, {0x00B72, 0x00B77}, {0x00BE6, 0x00BF2}, {0x00C66, 0x00C6F},
    {0x00C78, 0x00C7E}, {0x00CE6, 0x00CEF}, {0x00D58, 0x00D5E}, {0x00D66, 0x00D78}, {0x00DE6, 0x00DEF},
    {0x00E50, 0x00E59}, {0x00ED0, 0x00ED9}, {0x00F20, 0x00F33}, {0x01040, 0x01049}, {0x01090, 0x01099},
    {0x01369, 0x0137C}, {0x016EE, 0x016F0}, {0x017E0, 0x017E9}, {0x017F0, 0x017F9}, {0x01810, 0x01819},
    {0x01946, 0x0194F}, {0x019D0, 0x019DA}, {0x01A80, 0x01A89}, {0x01A90, 0x01A99}, {0x01B50, 0x01B59},
    {0x01BB0, 0x01BB9}, {0x01C40, 0x01C49}, {0x01C50, 0x01C59}, {0x02070, 0x02070}, {0x02074, 0x02079},
    {0x02080, 0x02089}, {0x02150, 0x02182}, {0x02185, 0x02189}, {0x02460, 0x0249B}, {0x024EA, 0x024FF},
    {0x02776, 0x02793}, {0x02CFD, 0x02CFD}, {0x03007, 0x03007}, {0x03021, 0x03029}, {0x03038, 0x0303A},
    {0x03192, 0x03195}, {0x03220, 0x03229}, {0x03248, 0x0324F}, {0x03251, 0x0325F}, {0x03280, 0x03289},
    {0x032B1, 0x032BF}, {0x0A620, 0x0A629}, {0x0A6E6, 0x0A6EF}, {0x0A830, 0x0A835}, {0x0A8D0, 0x0A8D9},
    {0x0A900, 0x0A909}, {0x0A9D0, 0x0A9D9}, {0x0A9F0, 0x0A9F9}, {0x0AA50, 0x0AA59}, {0x0ABF0, 0x0ABF9},
    {0x0FF10, 0x0FF19}, {0x10107, 0x10133}, {0x10140, 0x10178}, {0x1018A, 0x1018B}, {0x102E1, 0x102FB},
    {0x10320, 0x10323}, {0x10341, 0x10341}, {0x1034A, 0x1034A}, {0x103D1, 0x103D5}, {0x104A0, 0x104A9},
    {0x10858, 0x1085F}, {0x10879, 0x1087F}, {0x108A7, 0x108AF}, {0x108FB, 0x108FF}, {0x10916, 0x1091B},
    {0x109BC, 0x109BD}, {0x109C0, 0x109CF}, {0x109D2, 0x109FF}, {0x10A40, 0x10A48}, {0x10A7D, 0x10A7E},
    {0x10A9D, 0x10A9F}, {0x10AEB, 0x10AEF}, {0x10B58, 0x10B5F}, {0x10B78, 0x10B7F}, {0x10BA9, 0x10BAF},
    {0x10CFA, 0x10CFF}, {0x10D30, 0x10D39}, {0x10E60, 0x10E7E}, {0x10F1D, 0x10F26}, {0x10F51, 0x10F54},
    {0x10FC5, 0x10FCB}, {0x11052, 0x1106F}, {0x110F0, 0x110F9}, {0x11136, 0x1113F}, {0x111D0, 0x111D9},
    {0x111E1, 0x111F4}, {0x112F0, 0x112F9}, {0x11450, 0x11459}, {0x114D0, 0x114D9}, {0x11650, 0x11659},
    {0x116C0, 0x116C9}, {0x11730, 0x1173B}, {0x118E0, 0x118F2}, {0x11950, 0x11959}, {0x11C50, 0x11C6C},
    {0x11D50, 0x11D59}, {0x11DA0, 0x11DA9}, {0x11FC0, 0x11FD4}, {0x12400, 0x1246E}, {0x16A60, 0x16A69},
    {0x16AC0, 0x16AC9}, {0x16B50, 0x16B59}, {0x16B5B, 0x16B61}, {0x16E80, 0x16E96}, {0x1D2E0, 0x1D2F3},
    {0x1D360, 0x1D378}, {0x1D7CE, 0x1D7FF}, {0x1E140, 0x1E149}, {0x1E2F0, 0x1E2F9}, {0x1E8C7, 0x1E8CF},
    {0x1E950, 0x1E959}, {0x1EC71, 0x1ECAB}, {0x1ECAD, 0x1ECAF}, {0x1ECB1, 0x1ECB4}, {0x1ED01, 0x1ED2D},
    {0x1ED2F, 0x1ED3D}, {0x1F100, 0x1F10C}, {0x1FBF0, 0x1FBF9},
};

static bool in_ranges(const cp_bpe_range *r, size_t n, int32_t cp)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < r[mid].first)
            hi = mid;
        else if (cp > r[mid].last)
            lo = mid + 1;
        else
            return true;
    }
    return false;
}

/* The character classes that the pre-tokenizer pattern distinguishes. */
typedef enum char_class {
    CLASS_LETTER, /* \p{L} */
    CLASS_NUMBER, /* \p{N} */
    CLASS_SPACE,  /* \s: Unicode White_Space, as Oniguruma's \s */
    CLASS_OTHER,  /* everything else, including invalid UTF-8 bytes */
} char_class;

static char_class classify(int32_t cp)
{
    if (cp < 0)
        return CLASS_OTHER;
    if (cp < 0x80) {
        if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z'))
            return CLASS_LETTER;
        if (cp >= '0' && cp <= '9')
            return CLASS_NUMBER;
        return cp == ' ' || (cp >= 0x09 && cp <= 0x0D) ? CLASS_SPACE : CLASS_OTHER;
    }
    if (cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
        cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000)
        return CLASS_SPACE;
    if (in_ranges(letter_ranges, sizeof letter_ranges / sizeof *letter_ranges, cp))
        return CLASS_LETTER;
    if (in_ranges(number_ranges, sizeof number_ranges / sizeof *number_ranges, cp))
        return CLASS_NUMBER;
    return CLASS_OTHER;
}

static char_class class_at(const char *text, size_t len, size_t pos, size_t *n)
{
    int32_t cp;
    *n = utf8_decode(text, len, pos, &cp);
    return classify(cp);
}

/* ---------------------------------------------------------------------- */
/* Pre-tokenizer                                                          */
/* ---------------------------------------------------------------------- */

/* Returns the length of a contraction ('s 't 're 've 'm 'll 'd, lowercase
 * only, as in GPT-2) at pos, or 0. */
static size_t contraction_len(const char *text, size_t len, size_t pos)
{
    if (text[pos] != '\'' || pos + 1 >= len)
        return 0;
    char a = text[pos + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd')
        return 2;
    if (pos + 2 >= len)
        return 0;
    char b = text[pos + 2];
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
        return 3;
    return 0;
}

/* Returns the ASCII lowercase letter that the character at pos matches
 * under Unicode simple case folding, or 0 for any other character. Only
 * U+017F LATIN SMALL LETTER LONG S folds to an ASCII letter that a
 * contraction uses (U+212A KELVIN SIGN folds to 'k', which none uses). */
static char folded_ascii_at(const char *text, size_t len, size_t pos, size_t *n)
{
    int32_t cp;
    *n = utf8_decode(text, len, pos, &cp);
    if (cp >= 'A' && cp <= 'Z')
        return (char)(cp - 'A' + 'a');
    if (cp >= 'a' && cp <= 'z')
        return (char)cp;
    return cp == 0x17F ? 's' : 0;
}

/* Returns the length of a contraction matched case-insensitively, as
 * (?i:'s|'t|'re|'ve|'m|'ll|'d) does, at pos, or 0. */
static size_t contraction_len_any_case(const char *text, size_t len, size_t pos)
{
    if (text[pos] != '\'' || pos + 1 >= len)
        return 0;
    size_t n1, n2;
    char a = folded_ascii_at(text, len, pos + 1, &n1);
    if (a == 's' || a == 't' || a == 'm' || a == 'd')
        return 1 + n1;
    if (pos + 1 + n1 >= len)
        return 0;
    char b = folded_ascii_at(text, len, pos + 1 + n1, &n2);
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
        return 1 + n1 + n2;
    return 0;
}

/* Returns the end of the run of characters of class cls from pos on. For
 * CLASS_OTHER the run is every character that is not a space, letter or
 * number. */
static size_t run_end(const char *text, size_t len, size_t pos, char_class cls)
{
    size_t n;
    while (pos < len && class_at(text, len, pos, &n) == cls)
        pos += n;
    return pos;
}

static bool is_newline(char c)
{
    return c == '\r' || c == '\n';
}

/* Matches the whitespace alternatives at pos, where a space character
 * starts. With newlines set (Llama-3 and Qwen2, whose \s*[\r\n]+ comes
 * first), a run that contains '\r' or '\n' ends after its last one.
 * Otherwise \s+(?!\S) | \s+ applies: the run gives up its last character
 * when a non-space follows and the run has two or more characters, so that
 * the last space can start the next word. */
static size_t space_run_end(const char *text, size_t len, size_t pos, bool newlines)
{
    size_t end = pos, last = pos, n;
    size_t after_newline = 0; /* 0: no newline in the run yet */
    while (end < len && class_at(text, len, end, &n) == CLASS_SPACE) {
        if (is_newline(text[end]))
            after_newline = end + 1;
        last = end;
        end += n;
    }
    if (newlines && after_newline)
        return after_newline;
    if (end == len || last == pos)
        return end;
    return last;
}

/* Tries GPT-2's alternatives in order, as a backtracking regex would:
 *   's|'t|'re|'ve|'m|'ll|'d | ?\p{L}+ | ?\p{N}+ | ?[^\s\p{L}\p{N}]+
 *   | \s+(?!\S) | \s+ */
static size_t gpt2_pretoken_end(const char *text, size_t len, size_t pos)
{
    size_t n = contraction_len(text, len, pos);
    if (n)
        return pos + n;

    size_t start = pos;
    if (text[pos] == ' ' && pos + 1 < len)
        start = pos + 1;
    char_class cls = class_at(text, len, start, &n);
    if (cls != CLASS_SPACE)
        return run_end(text, len, start, cls);
    return space_run_end(text, len, pos, false);
}

/* Returns the end of at most max_digits characters of class \p{N} from pos
 * on, where one starts. */
static size_t number_run_end(const char *text, size_t len, size_t pos, int max_digits)
{
    size_t n;
    for (int i = 0; i < max_digits && pos < len; i++) {
        if (class_at(text, len, pos, &n) != CLASS_NUMBER)
            break;
        pos += n;
    }
    return pos;
}

/* Tries the Llama-3 alternatives in order, as a backtracking regex would:
 *   (?i:'s|'t|'re|'ve|'m|'ll|'d) | [^\r\n\p{L}\p{N}]?\p{L}+ | \p{N}{1,3}
 *   | ?[^\s\p{L}\p{N}]+[\r\n]* | \s*[\r\n]+ | \s+(?!\S) | \s+
 * Qwen2's pattern is the same with \p{N} one at a time (max_digits 1). */
static size_t llama3_pretoken_end(const char *text, size_t len, size_t pos, int max_digits)
{
    size_t n = contraction_len_any_case(text, len, pos);
    if (n)
        return pos + n;

    /* A letter run, after at most one character that is not a newline,
     * letter or number (a space, a tab or punctuation). */
    size_t first_len, next_len;
    char_class first = class_at(text, len, pos, &first_len);
    if (first == CLASS_LETTER)
        return run_end(text, len, pos, CLASS_LETTER);
    if (first != CLASS_NUMBER && !is_newline(text[pos]) && pos + first_len < len &&
        class_at(text, len, pos + first_len, &next_len) == CLASS_LETTER)
        return run_end(text, len, pos + first_len, CLASS_LETTER);

    if (first == CLASS_NUMBER)
        return number_run_end(text, len, pos, max_digits);

    /* Punctuation after an optional ' ', with the newlines that follow. */
    size_t start = pos;
    if (text[pos] == ' ' && pos + 1 < len)
        start = pos + 1;
    if (class_at(text, len, start, &n) == CLASS_OTHER) {
        size_t end = run_end(text, len, start, CLASS_OTHER);
        while (end < len && is_newline(text[end]))
            end++;
        return end;
    }
    return space_run_end(text, len, pos, true);
}

size_t cp_bpe_pattern_pretoken_end(cp_bpe_pattern pattern, const char *text, size_t len,
                                   size_t pos)
{
    switch (pattern) {
    case CP_BPE_PATTERN_LLAMA3:
        return llama3_pretoken_end(text, len, pos, 3);
    case CP_BPE_PATTERN_QWEN2:
        return llama3_pretoken_end(text, len, pos, 1);
    case CP_BPE_PATTERN_GPT2:
        break;
    }
    return gpt2_pretoken_end(text, len, pos);
}

size_t cp_bpe_pretoken_end(const char *text, size_t len, size_t pos)
{
    return gpt2_pretoken_end(text, len, pos);
}

/* ---------------------------------------------------------------------- */
/* Token and merge tables                                                 */
/* ---------------------------------------------------------------------- */

static cp_status load_fail(cp_error *err, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Fills err with CP_ERR_INPUT and "path: <what>". */
static cp_status load_fail(cp_error *err, const char *path, const char *fmt, ...)
{
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return cp_error_set(err, CP_ERR_INPUT, "%s: %s", path, what);
}

static uint32_t hash_bytes(const char *s, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

static uint32_t hash_pair(uint64_t pair)
{
    pair *= 0x9E3779B97F4A7C15ull;
    return (uint32_t)(pair >> 32);
}

/* Returns the smallest power of two >= 2 * n (at least 16). */
static uint32_t table_size_for(size_t n)
{
    uint32_t size = 16;
    while (size < 2 * n)
        size *= 2;
    return size;
}

static int32_t *table_alloc(uint32_t size, cp_error *err)
{
    int32_t *table = malloc((size_t)size * sizeof *table);
    if (!table) {
        cp_error_nomem(err, "a hash table", (size_t)size * sizeof *table);
        return NULL;
    }
    memset(table, 0xFF, (size_t)size * sizeof *table); /* every slot -1 */
    return table;
}

/* Returns the id of the vocabulary token with these raw bytes, or -1. */
static int32_t lookup_token(const cp_bpe_model *m, const char *bytes, size_t len)
{
    for (uint32_t i = hash_bytes(bytes, len) & m->token_mask;; i = (i + 1) & m->token_mask) {
        int32_t id = m->token_table[i];
        if (id < 0)
            return -1;
        if (m->token_len[id] == len && memcmp(m->token_bytes + m->token_offset[id], bytes, len) == 0)
            return id;
    }
}

int32_t cp_bpe_token_id(const cp_bpe_model *m, const char *bytes, size_t len)
{
    int32_t id = lookup_token(m, bytes, len);
    for (int32_t i = 0; id < 0 && i < m->n_added; i++) {
        int32_t a = m->added_ids[i];
        if (m->token_len[a] == len && memcmp(m->token_bytes + m->token_offset[a], bytes, len) == 0)
            id = a;
    }
    return id;
}

/* Returns the rank of the merge of left and right, or -1. */
static int32_t lookup_merge(const cp_bpe_model *m, int32_t left, int32_t right)
{
    uint64_t pair = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    for (uint32_t i = hash_pair(pair) & m->merge_mask;; i = (i + 1) & m->merge_mask) {
        int32_t rank = m->merge_table[i];
        if (rank < 0 || m->merge_pair[rank] == pair)
            return rank;
    }
}

void cp_bpe_free(cp_bpe_model *m)
{
    if (!m)
        return;
    free(m->token_bytes);
    free(m->token_offset);
    free(m->token_len);
    free(m->token_special);
    free(m->token_table);
    free(m->merge_pair);
    free(m->merge_result);
    free(m->merge_table);
    free(m->added_ids);
    free(m);
}

/* Converts a token as vocab files write it (UTF-8, one code point per raw
 * byte) into raw bytes at out, which has room for len bytes. Returns the
 * byte count, or -1 if some code point is not in the byte table. */
static long unmap_token(const int16_t *byte_of, const char *text, size_t len, char *out)
{
    size_t n = 0;
    for (size_t pos = 0; pos < len;) {
        int32_t cp;
        pos += utf8_decode(text, len, pos, &cp);
        if (cp < 0 || cp >= BYTE_CODE_POINTS || byte_of[cp] < 0)
            return -1;
        out[n++] = (char)byte_of[cp];
    }
    return (long)n;
}

/* An added token as tokenizer.json lists it; content points into the JSON. */
typedef struct added_token {
    int32_t id;
    const char *content;
    size_t len;
    bool special;
} added_token;

/* Reads a non-negative integer below limit into *out. */
static bool json_index(const cJSON *item, double limit, int32_t *out)
{
    if (!cJSON_IsNumber(item))
        return false;
    double v = item->valuedouble;
    if (!(v >= 0 && v < limit) || v != (double)(int32_t)v)
        return false;
    *out = (int32_t)v;
    return true;
}

static cp_status tokens_alloc(cp_bpe_model *m, int32_t n_tokens, size_t blob_cap, cp_error *err)
{
    m->n_tokens = n_tokens;
    m->token_bytes = malloc(blob_cap ? blob_cap : 1);
    m->token_offset = calloc((size_t)n_tokens, sizeof *m->token_offset);
    m->token_len = malloc((size_t)n_tokens * sizeof *m->token_len);
    m->token_special = calloc((size_t)n_tokens, 1);
    m->token_mask = table_size_for((size_t)n_tokens) - 1;
    m->token_table = table_alloc(m->token_mask + 1, err);
    if (!m->token_table)
        return CP_ERR_NOMEM;
    if (!m->token_bytes || !m->token_offset || !m->token_len || !m->token_special)
        return cp_error_nomem(err, "the token table", blob_cap + (size_t)n_tokens * 9);
    for (int32_t id = 0; id < n_tokens; id++)
        m->token_len[id] = UINT32_MAX; /* not yet seen */
    return CP_OK;
}

/* Inserts the vocabulary token id into the bytes-to-id hash. Returns the id
 * already there if another token has the same raw bytes, or -1. */
static int32_t token_table_insert(cp_bpe_model *m, int32_t id)
{
    const char *bytes = m->token_bytes + m->token_offset[id];
    uint32_t len = m->token_len[id];
    int32_t old = lookup_token(m, bytes, len);
    if (old >= 0)
        return old;
    uint32_t i = hash_bytes(bytes, len) & m->token_mask;
    while (m->token_table[i] >= 0)
        i = (i + 1) & m->token_mask;
    m->token_table[i] = id;
    return -1;
}

/* Stores token id from its vocab-file spelling as raw bytes at
 * token_bytes + *used and indexes it. A token with a code point outside the
 * byte table keeps its UTF-8 text and cannot be reached by merges. Returns
 * the id of an earlier token with the same raw bytes, or -1. */
static int32_t put_vocab_token(cp_bpe_model *m, const int16_t *byte_of, int32_t id,
                               const char *text, size_t len, size_t *used)
{
    char *out = m->token_bytes + *used;
    long n = unmap_token(byte_of, text, len, out);
    m->token_offset[id] = (uint32_t)*used;
    m->token_len[id] = (uint32_t)(n < 0 ? len : (size_t)n);
    *used += m->token_len[id];
    if (n < 0) {
        memcpy(out, text, len);
        return -1;
    }
    return token_table_insert(m, id);
}

/* Stores an added token's text as it is, replacing the vocabulary's
 * spelling where the id has one. */
static void put_added_token(cp_bpe_model *m, int32_t id, const char *text, size_t len,
                            bool special, size_t *used)
{
    memcpy(m->token_bytes + *used, text, len);
    m->token_offset[id] = (uint32_t)*used;
    m->token_len[id] = (uint32_t)len;
    m->token_special[id] = special;
    *used += len;
}

/* Copies every entry of the JSON object vocab ("token": id) into the token
 * table, as raw bytes. *used counts the bytes used in token_bytes. */
static cp_status add_vocab(cp_bpe_model *m, const char *path, const char *key, const cJSON *vocab,
                           size_t *used, cp_error *err)
{
    int16_t byte_of[BYTE_CODE_POINTS];
    build_byte_table(byte_of);
    const cJSON *item;
    cJSON_ArrayForEach(item, vocab)
    {
        int32_t id;
        if (!json_index(item, m->n_tokens, &id))
            return load_fail(err, path, "%s: the id of token \"%.60s\" is not an integer in 0..%d",
                             key, item->string, m->n_tokens - 1);
        if (m->token_len[id] != UINT32_MAX)
            return load_fail(err, path, "%s: id %d is used by two tokens (\"%.60s\")", key, id,
                             item->string);
        if (put_vocab_token(m, byte_of, id, item->string, strlen(item->string), used) >= 0)
            return load_fail(err, path, "%s: token \"%.60s\" is listed twice", key, item->string);
    }
    return CP_OK;
}

/* Gives each added token its text and its special flag. */
static void add_added(cp_bpe_model *m, const added_token *added, int32_t n_added, size_t *used)
{
    for (int32_t i = 0; i < n_added; i++)
        put_added_token(m, added[i].id, added[i].content, added[i].len, added[i].special, used);
}

/* Builds the token table from the vocabulary object and the added tokens.
 * Ids must cover 0..n-1 with no gap. */
static cp_status build_tokens(cp_bpe_model *m, const char *path, const char *key,
                              const cJSON *vocab, const added_token *added, int32_t n_added,
                              cp_error *err)
{
    if (!cJSON_IsObject(vocab))
        return load_fail(err, path, "%s is missing or not a JSON object of token ids", key);
    int n_vocab = cJSON_GetArraySize(vocab);
    if (n_vocab <= 0 || n_vocab > MAX_TOKENS)
        return load_fail(err, path, "%s has %d tokens; expected 1 to %d", key, n_vocab,
                         MAX_TOKENS);

    int32_t n_tokens = n_vocab;
    size_t blob_cap = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, vocab)
    {
        blob_cap += strlen(item->string);
    }
    for (int32_t i = 0; i < n_added; i++) {
        blob_cap += added[i].len;
        if (added[i].id >= n_tokens)
            n_tokens = added[i].id + 1;
    }
    if (blob_cap > UINT32_MAX)
        return load_fail(err, path, "%s: the tokens take %zu bytes; at most 4 GiB fit", key,
                         blob_cap);
    cp_status st = tokens_alloc(m, n_tokens, blob_cap, err);
    if (st)
        return st;

    size_t used = 0;
    st = add_vocab(m, path, key, vocab, &used, err);
    if (st)
        return st;
    add_added(m, added, n_added, &used);
    for (int32_t id = 0; id < n_tokens; id++) {
        if (m->token_len[id] == UINT32_MAX)
            return load_fail(err, path, "id %d is neither in %s nor in added_tokens", id, key);
    }
    return CP_OK;
}

static bool token_is(const cp_bpe_model *m, int32_t id, const char *text)
{
    size_t n = strlen(text);
    return m->token_len[id] == n && memcmp(m->token_bytes + m->token_offset[id], text, n) == 0;
}

/* Looks up the single-byte tokens and indexes the added tokens (longest
 * first, so the longest match wins) and the EOS. */
static cp_status index_tokens(cp_bpe_model *m, const int32_t *added_ids, int32_t n_added,
                              cp_error *err)
{
    for (int b = 0; b < 256; b++) {
        char c = (char)b;
        m->byte_ids[b] = lookup_token(m, &c, 1);
    }
    m->added_ids = malloc((size_t)(n_added ? n_added : 1) * sizeof *m->added_ids);
    if (!m->added_ids)
        return cp_error_nomem(err, "the added tokens", (size_t)n_added * sizeof *m->added_ids);
    m->n_added = n_added;
    m->eos_id = -1;
    m->bos_id = -1;
    int32_t end_of_text = -1;
    for (int32_t i = 0; i < n_added; i++) {
        int32_t id = added_ids[i], j = i;
        while (j > 0 && m->token_len[m->added_ids[j - 1]] < m->token_len[id]) {
            m->added_ids[j] = m->added_ids[j - 1];
            j--;
        }
        m->added_ids[j] = id;
        const uint8_t *text = (const uint8_t *)m->token_bytes + m->token_offset[id];
        m->added_first[text[0] / 8] |= (uint8_t)(1u << (text[0] % 8));
        if (token_is(m, id, "<|endoftext|>"))
            m->eos_id = id;
        if (token_is(m, id, "<|end_of_text|>"))
            end_of_text = id;
    }
    if (m->eos_id < 0)
        m->eos_id = end_of_text; /* Llama-3's name for it */
    return CP_OK;
}

static cp_status merges_alloc(cp_bpe_model *m, size_t count, cp_error *err)
{
    m->merge_pair = malloc((count ? count : 1) * sizeof *m->merge_pair);
    m->merge_result = malloc((count ? count : 1) * sizeof *m->merge_result);
    if (!m->merge_pair || !m->merge_result)
        return cp_error_nomem(err, "the merge table", count * 12);
    m->merge_mask = table_size_for(count) - 1;
    m->merge_table = table_alloc(m->merge_mask + 1, err);
    return m->merge_table ? CP_OK : CP_ERR_NOMEM;
}

/* A source position for merge error messages: "model.merges[3]" or
 * "line 4". */
typedef struct merge_source {
    const char *path;
    char where[64];
    const char *hint; /* "; what to do" after every message, or NULL */
    int16_t byte_of[BYTE_CODE_POINTS];
} merge_source;

static const char *merge_hint(const merge_source *src)
{
    return src->hint ? src->hint : "";
}

/* Looks up one side of a merge by its vocab-file spelling. */
static cp_status merge_side(const cp_bpe_model *m, const merge_source *src, const char *text,
                            size_t len, char *raw, long *raw_len, int32_t *id, cp_error *err)
{
    *raw_len = unmap_token(src->byte_of, text, len, raw);
    *id = *raw_len < 0 ? -1 : lookup_token(m, raw, (size_t)*raw_len);
    if (*id < 0)
        return load_fail(err, src->path, "%s: token \"%.*s\" is not in the vocabulary%s",
                         src->where, (int)(len < 60 ? len : 60), text, merge_hint(src));
    return CP_OK;
}

/* Appends the merge of left and right as the next rank. A pair listed
 * twice keeps its first (lower) rank. */
static cp_status add_merge(cp_bpe_model *m, const merge_source *src, const char *left,
                           size_t left_len, const char *right, size_t right_len, cp_error *err)
{
    if (left_len == 0 || right_len == 0)
        return load_fail(err, src->path, "%s: expected two tokens separated by one space%s",
                         src->where, merge_hint(src));
    char *raw = malloc(left_len + right_len);
    if (!raw)
        return cp_error_nomem(err, "a merge", left_len + right_len);
    long n_left = 0, n_right = 0;
    int32_t left_id, right_id, result = -1;
    cp_status st = merge_side(m, src, left, left_len, raw, &n_left, &left_id, err);
    if (!st)
        st = merge_side(m, src, right, right_len, raw + n_left, &n_right, &right_id, err);
    if (!st) {
        result = lookup_token(m, raw, (size_t)(n_left + n_right));
        if (result < 0)
            st = load_fail(err, src->path, "%s: the merged token \"%.*s%.*s\" is not in the "
                           "vocabulary%s", src->where, (int)(left_len < 60 ? left_len : 60), left,
                           (int)(right_len < 60 ? right_len : 60), right, merge_hint(src));
    }
    free(raw);
    if (st || lookup_merge(m, left_id, right_id) >= 0)
        return st;

    int32_t rank = m->n_merges++;
    m->merge_pair[rank] = (uint64_t)(uint32_t)left_id << 32 | (uint32_t)right_id;
    m->merge_result[rank] = result;
    uint32_t i = hash_pair(m->merge_pair[rank]) & m->merge_mask;
    while (m->merge_table[i] >= 0)
        i = (i + 1) & m->merge_mask;
    m->merge_table[i] = rank;
    return CP_OK;
}

/* Splits "left right" at its one space and adds the merge. */
static cp_status add_merge_line(cp_bpe_model *m, const merge_source *src, const char *line,
                                size_t len, cp_error *err)
{
    const char *space = memchr(line, ' ', len);
    if (!space || memchr(space + 1, ' ', len - (size_t)(space + 1 - line)))
        return load_fail(err, src->path, "%s: expected two tokens separated by one space, "
                         "found \"%.*s\"%s", src->where, (int)(len < 60 ? len : 60), line,
                         merge_hint(src));
    return add_merge(m, src, line, (size_t)(space - line), space + 1,
                     len - (size_t)(space + 1 - line), err);
}

/* ---------------------------------------------------------------------- */
/* Loading                                                                */
/* ---------------------------------------------------------------------- */

/* Reads path and parses it as JSON. *json is NULL on error. */
static cp_status read_json(const char *path, cJSON **json, cp_error *err)
{
    *json = NULL;
    char *text = NULL;
    size_t len = 0;
    cp_status st = cp_file_read(path, &text, &len, err);
    if (st)
        return st;
    const char *end = NULL;
    *json = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!*json) {
        size_t offset = end && end >= text ? (size_t)(end - text) : 0;
        st = load_fail(err, path, "byte %zu: invalid JSON; the file is cut short or not JSON "
                       "(re-download it)", offset);
    }
    free(text);
    return st;
}

static bool json_is_null_or_absent(const cJSON *item)
{
    return !item || cJSON_IsNull(item);
}

static bool json_type_is(const cJSON *obj, const char *type)
{
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(obj, "type");
    return cJSON_IsString(t) && strcmp(t->valuestring, type) == 0;
}

static const char *json_type_name(const cJSON *obj)
{
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(obj, "type");
    return cJSON_IsString(t) ? t->valuestring : "(no type)";
}

/* The Split regexes of Meta-Llama-3's and Qwen2's tokenizer.json files,
 * as the JSON strings decode. */
static const char LLAMA3_REGEX[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char QWEN2_REGEX[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* Checks a ByteLevel pre-tokenizer at key: no prefix space, and use_regex
 * (absent means true) equal to want_regex. */
static cp_status check_byte_level(const char *path, const char *key, const cJSON *pre,
                                  bool want_regex, cp_error *err)
{
    if (!cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(pre, "add_prefix_space")))
        return load_fail(err, path, "%s.add_prefix_space: only false is supported", key);
    const cJSON *regex = cJSON_GetObjectItemCaseSensitive(pre, "use_regex");
    bool use_regex = !regex || cJSON_IsTrue(regex);
    if (use_regex != want_regex)
        return load_fail(err, path, "%s.use_regex: only %s is supported %s", key,
                         want_regex ? "true" : "false",
                         want_regex ? "in a ByteLevel pre-tokenizer on its own (GPT-2)"
                                    : "after a Split (Llama-3, Qwen2)");
    return CP_OK;
}

/* Reads the Split pre-tokenizer at key, whose regex must be Llama-3's or
 * Qwen2's, with behavior Isolated and no inversion. */
static cp_status parse_split(const char *path, const char *key, const cJSON *split,
                             cp_bpe_pattern *pattern, cp_error *err)
{
    const cJSON *regex =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(split, "pattern"), "Regex");
    if (!cJSON_IsString(regex))
        return load_fail(err, path, "%s.pattern: expected {\"Regex\": ...} with the Llama-3 or "
                         "Qwen2 pattern, found no Regex string", key);
    if (strcmp(regex->valuestring, LLAMA3_REGEX) == 0)
        *pattern = CP_BPE_PATTERN_LLAMA3;
    else if (strcmp(regex->valuestring, QWEN2_REGEX) == 0)
        *pattern = CP_BPE_PATTERN_QWEN2;
    else
        return load_fail(err, path, "%s.pattern.Regex is \"%.160s\", which is not supported; "
                         "only the Llama-3 and Qwen2 patterns are", key, regex->valuestring);

    const cJSON *behavior = cJSON_GetObjectItemCaseSensitive(split, "behavior");
    if (!cJSON_IsString(behavior) || strcmp(behavior->valuestring, "Isolated") != 0)
        return load_fail(err, path, "%s.behavior is %s%s%s, expected \"Isolated\"", key,
                         cJSON_IsString(behavior) ? "\"" : "",
                         cJSON_IsString(behavior) ? behavior->valuestring : "missing",
                         cJSON_IsString(behavior) ? "\"" : "");
    const cJSON *invert = cJSON_GetObjectItemCaseSensitive(split, "invert");
    if (invert && !cJSON_IsFalse(invert))
        return load_fail(err, path, "%s.invert: only false is supported", key);
    return CP_OK;
}

/* Reads a Sequence pre-tokenizer, which must be [Split, ByteLevel]: the
 * Llama-3 or Qwen2 regex, then the byte-to-unicode mapping without GPT-2's
 * regex. */
static cp_status parse_pre_sequence(const char *path, const cJSON *pre, cp_bpe_pattern *pattern,
                                    cp_error *err)
{
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(pre, "pretokenizers");
    const cJSON *split = cJSON_GetArrayItem(list, 0), *byte_level = cJSON_GetArrayItem(list, 1);
    if (!cJSON_IsArray(list) || cJSON_GetArraySize(list) != 2 || !json_type_is(split, "Split") ||
        !json_type_is(byte_level, "ByteLevel")) {
        char found[160] = "";
        const cJSON *item;
        cJSON_ArrayForEach(item, list)
        {
            size_t used = strlen(found);
            snprintf(found + used, sizeof found - used, "%s%s", used ? ", " : "",
                     json_type_name(item));
        }
        return load_fail(err, path, "pre_tokenizer.pretokenizers is [%s], expected [Split, "
                         "ByteLevel] as in Llama-3 and Qwen2", found);
    }
    cp_status st = parse_split(path, "pre_tokenizer.pretokenizers[0]", split, pattern, err);
    if (!st)
        st = check_byte_level(path, "pre_tokenizer.pretokenizers[1]", byte_level, false, err);
    return st;
}

/* Sets m->pattern from pre_tokenizer: ByteLevel with its regex (GPT-2) or
 * a Sequence of Split and ByteLevel (Llama-3, Qwen2). */
static cp_status parse_pre_tokenizer(cp_bpe_model *m, const char *path, const cJSON *root,
                                     cp_error *err)
{
    const cJSON *pre = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    if (json_type_is(pre, "ByteLevel")) {
        m->pattern = CP_BPE_PATTERN_GPT2;
        return check_byte_level(path, "pre_tokenizer", pre, true, err);
    }
    if (json_type_is(pre, "Sequence"))
        return parse_pre_sequence(path, pre, &m->pattern, err);
    return load_fail(err, path, "pre_tokenizer: type %s is not supported; only ByteLevel "
                     "(GPT-2) and a Sequence of Split and ByteLevel (Llama-3, Qwen2) are",
                     json_type_name(pre));
}

/* Checks the BPE model's settings and reads ignore_merges. */
static cp_status check_model(cp_bpe_model *m, const char *path, const cJSON *model, cp_error *err)
{
    if (!cJSON_IsObject(model))
        return load_fail(err, path, "model is missing or not a JSON object");
    if (!json_type_is(model, "BPE"))
        return load_fail(err, path, "model.type: %s is not supported; only BPE is",
                         json_type_name(model));
    static const char *const must_be_empty[] = {"dropout", "continuing_subword_prefix",
                                                "end_of_word_suffix"};
    for (size_t i = 0; i < sizeof must_be_empty / sizeof *must_be_empty; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(model, must_be_empty[i]);
        if (!json_is_null_or_absent(v) && !(cJSON_IsString(v) && v->valuestring[0] == '\0'))
            return load_fail(err, path, "model.%s: only null is supported", must_be_empty[i]);
    }
    const cJSON *fallback = cJSON_GetObjectItemCaseSensitive(model, "byte_fallback");
    if (fallback && !cJSON_IsFalse(fallback))
        return load_fail(err, path, "model.byte_fallback: only false is supported");
    const cJSON *ignore = cJSON_GetObjectItemCaseSensitive(model, "ignore_merges");
    if (ignore && !cJSON_IsBool(ignore))
        return load_fail(err, path, "model.ignore_merges: expected true or false");
    m->ignore_merges = cJSON_IsTrue(ignore);
    return CP_OK;
}

/* Rejects the tokenizer.json settings that this tokenizer does not
 * implement, so that no file is silently encoded differently, and reads the
 * pre-tokenizer pattern and ignore_merges into m. */
static cp_status check_pipeline(cp_bpe_model *m, const char *path, const cJSON *root,
                                cp_error *err)
{
    const cJSON *norm = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
    if (!json_is_null_or_absent(norm))
        return load_fail(err, path, "normalizer: type %s is not supported; only null is",
                         json_type_name(norm));
    cp_status st = parse_pre_tokenizer(m, path, root, err);
    if (st)
        return st;
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    if (!json_is_null_or_absent(dec) && !json_type_is(dec, "ByteLevel"))
        return load_fail(err, path, "decoder: type %s is not supported; only ByteLevel is",
                         json_type_name(dec));
    return check_model(m, path, cJSON_GetObjectItemCaseSensitive(root, "model"), err);
}

/* Sets m->bos_id from a TemplateProcessing post-processor (at key) whose
 * "single" template starts with a special token, as Llama-3's does.
 * NOTE: special tokens later in the template (an appended EOS) are ignored. */
static cp_status parse_template(cp_bpe_model *m, const char *path, const char *key,
                                const cJSON *processor, cp_error *err)
{
    const cJSON *first = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(processor, "single"), 0);
    const cJSON *special = cJSON_GetObjectItemCaseSensitive(first, "SpecialToken");
    if (!special)
        return CP_OK; /* the template starts with the text itself */
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(special, "id");
    if (!cJSON_IsString(name))
        return load_fail(err, path, "%s.single[0].SpecialToken.id is missing or not a string",
                         key);
    const cJSON *specials = cJSON_GetObjectItemCaseSensitive(processor, "special_tokens");
    const cJSON *ids =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(specials,
                                                                          name->valuestring),
                                         "ids");
    int32_t id;
    if (cJSON_GetArraySize(ids) != 1 || !json_index(cJSON_GetArrayItem(ids, 0), m->n_tokens, &id))
        return load_fail(err, path, "%s.special_tokens[\"%.60s\"].ids: expected one token id in "
                         "0..%d", key, name->valuestring, m->n_tokens - 1);
    m->bos_id = id;
    return CP_OK;
}

/* Reads the BOS token from post_processor: a TemplateProcessing, alone or
 * in a Sequence. Other post-processors (GPT-2's ByteLevel) add no tokens. */
static cp_status parse_post_processor(cp_bpe_model *m, const char *path, const cJSON *root,
                                      cp_error *err)
{
    const cJSON *post = cJSON_GetObjectItemCaseSensitive(root, "post_processor");
    if (json_type_is(post, "TemplateProcessing"))
        return parse_template(m, path, "post_processor", post, err);
    if (!json_type_is(post, "Sequence"))
        return CP_OK;
    int index = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(post, "processors"))
    {
        if (json_type_is(item, "TemplateProcessing")) {
            char key[64];
            snprintf(key, sizeof key, "post_processor.processors[%d]", index);
            return parse_template(m, path, key, item, err);
        }
        index++;
    }
    return CP_OK;
}

/* Checks one entry of added_tokens. */
static cp_status parse_added_token(const char *path, int index, const cJSON *item,
                                   added_token *out, cp_error *err)
{
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(item, "id");
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(item, "content");
    if (!json_index(id, MAX_TOKENS, &out->id))
        return load_fail(err, path, "added_tokens[%d].id is missing or not an integer in 0..%d",
                         index, MAX_TOKENS - 1);
    if (!cJSON_IsString(content) || content->valuestring[0] == '\0')
        return load_fail(err, path, "added_tokens[%d].content is missing or empty", index);
    static const char *const flags[] = {"lstrip", "rstrip", "single_word"};
    for (size_t i = 0; i < sizeof flags / sizeof *flags; i++) {
        if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(item, flags[i])))
            return load_fail(err, path, "added_tokens[%d].%s: only false is supported", index,
                             flags[i]);
    }
    out->content = content->valuestring;
    out->len = strlen(content->valuestring);
    out->special = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(item, "special"));
    return CP_OK;
}

/* Reads added_tokens into a malloc'd array (which *out owns even on error). */
static cp_status parse_added_tokens(const char *path, const cJSON *root, added_token **out,
                                    int32_t *n_out, cp_error *err)
{
    *n_out = 0;
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (json_is_null_or_absent(list)) {
        *out = NULL;
        return CP_OK;
    }
    if (!cJSON_IsArray(list))
        return load_fail(err, path, "added_tokens is not a JSON array");
    int n = cJSON_GetArraySize(list);
    *out = malloc((size_t)(n ? n : 1) * sizeof **out);
    if (!*out)
        return cp_error_nomem(err, "the added tokens", (size_t)n * sizeof **out);
    const cJSON *item;
    cJSON_ArrayForEach(item, list)
    {
        cp_status st = parse_added_token(path, *n_out, item, &(*out)[*n_out], err);
        if (st)
            return st;
        (*n_out)++;
    }
    return CP_OK;
}

/* Adds model.merges: "left right" strings or [left, right] pairs. */
static cp_status load_json_merges(cp_bpe_model *m, const char *path, const cJSON *model,
                                  cp_error *err)
{
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (!cJSON_IsArray(merges))
        return load_fail(err, path, "model.merges is missing or not a JSON array");
    merge_source src = {.path = path};
    build_byte_table(src.byte_of);
    cp_status st = merges_alloc(m, (size_t)cJSON_GetArraySize(merges), err);
    int index = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, merges)
    {
        if (st)
            break;
        snprintf(src.where, sizeof src.where, "model.merges[%d]", index++);
        const cJSON *left = cJSON_GetArrayItem(item, 0), *right = cJSON_GetArrayItem(item, 1);
        if (cJSON_IsString(item))
            st = add_merge_line(m, &src, item->valuestring, strlen(item->valuestring), err);
        else if (cJSON_IsArray(item) && cJSON_GetArraySize(item) == 2 && cJSON_IsString(left) &&
                 cJSON_IsString(right))
            st = add_merge(m, &src, left->valuestring, strlen(left->valuestring),
                           right->valuestring, strlen(right->valuestring), err);
        else
            st = load_fail(err, path, "%s: expected \"left right\" or [\"left\", \"right\"]",
                           src.where);
    }
    return st;
}

/* Builds the model from a parsed tokenizer.json. */
static cp_status build_from_json(cp_bpe_model *m, const char *path, const cJSON *root,
                                 cp_error *err)
{
    if (!cJSON_IsObject(root))
        return load_fail(err, path, "the file is not a JSON object");
    cp_status st = check_pipeline(m, path, root, err);
    if (st)
        return st;
    added_token *added = NULL;
    int32_t n_added = 0;
    st = parse_added_tokens(path, root, &added, &n_added, err);
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!st)
        st = build_tokens(m, path, "model.vocab", cJSON_GetObjectItemCaseSensitive(model, "vocab"),
                          added, n_added, err);
    int32_t *ids = malloc((size_t)(n_added ? n_added : 1) * sizeof *ids);
    if (!st && !ids)
        st = cp_error_nomem(err, "the added tokens", (size_t)n_added * sizeof *ids);
    for (int32_t i = 0; !st && i < n_added; i++)
        ids[i] = added[i].id;
    if (!st)
        st = index_tokens(m, ids, n_added, err);
    if (!st)
        st = load_json_merges(m, path, model, err);
    if (!st)
        st = parse_post_processor(m, path, root, err);
    free(ids);
    free(added);
    return st;
}

cp_status cp_bpe_load_json(const char *path, cp_bpe_model **out, cp_error *err)
{
    *out = NULL;
    cJSON *root = NULL;
    cp_status st = read_json(path, &root, err);
    if (st)
        return st;
    cp_bpe_model *m = calloc(1, sizeof *m);
    st = m ? build_from_json(m, path, root, err) : cp_error_nomem(err, "a tokenizer", sizeof *m);
    cJSON_Delete(root);
    if (st) {
        cp_bpe_free(m);
        return st;
    }
    *out = m;
    return CP_OK;
}

/* Adds the merges in merges.txt, one "left right" per line in rank order.
 * A first line starting with "#version" is a comment. */
static cp_status load_merges_txt(cp_bpe_model *m, const char *path, const char *text, size_t len,
                                 cp_error *err)
{
    size_t count = 0;
    for (size_t i = 0; i < len; i++)
        count += text[i] == '\n';
    cp_status st = merges_alloc(m, count + 1, err);
    merge_source src = {.path = path};
    build_byte_table(src.byte_of);
    size_t pos = 0;
    for (int line = 1; !st && pos < len; line++) {
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - text) : len, line_len = end - pos;
        if (line_len && text[end - 1] == '\r')
            line_len--;
        snprintf(src.where, sizeof src.where, "line %d", line);
        if (!(line == 1 && line_len >= 8 && memcmp(text, "#version", 8) == 0))
            st = add_merge_line(m, &src, text + pos, line_len, err);
        pos = end + 1;
    }
    return st;
}

/* Builds the model from vocab.json and merges.txt. */
static cp_status build_from_files(cp_bpe_model *m, const char *vocab_path, const cJSON *vocab,
                                  const char *merges_path, cp_error *err)
{
    cp_status st = build_tokens(m, vocab_path, "the vocabulary", vocab, NULL, 0, err);
    if (st)
        return st;
    int32_t eos = cp_bpe_token_id(m, "<|endoftext|>", 13);
    if (eos >= 0)
        m->token_special[eos] = 1;
    st = index_tokens(m, &eos, eos >= 0, err);
    char *text = NULL;
    size_t len = 0;
    if (!st)
        st = cp_file_read(merges_path, &text, &len, err);
    if (!st)
        st = load_merges_txt(m, merges_path, text, len, err);
    free(text);
    return st;
}

cp_status cp_bpe_load_files(const char *vocab_path, const char *merges_path, cp_bpe_model **out,
                            cp_error *err)
{
    *out = NULL;
    cJSON *vocab = NULL;
    cp_status st = read_json(vocab_path, &vocab, err);
    if (st)
        return st;
    cp_bpe_model *m = calloc(1, sizeof *m);
    st = m ? build_from_files(m, vocab_path, vocab, merges_path, err)
           : cp_error_nomem(err, "a tokenizer", sizeof *m);
    cJSON_Delete(vocab);
    if (st) {
        cp_bpe_free(m);
        return st;
    }
    *out = m;
    return CP_OK;
}

/* Fills the token table from v->tokens and appends the ids of the added
 * (CONTROL and USER_DEFINED) tokens to added, which has room for all. */
static cp_status put_vocab_tokens(cp_bpe_model *m, const char *name, const cp_bpe_vocab *v,
                                  int32_t *added, int32_t *n_added, cp_error *err)
{
    size_t blob_cap = 0;
    for (int32_t id = 0; id < v->n_tokens; id++)
        blob_cap += v->tokens[id].len;
    if (blob_cap > UINT32_MAX)
        return load_fail(err, name, "%s: the tokens take %zu bytes, expected at most 4 GiB; %s",
                         v->tokens_key, blob_cap, v->hint);
    cp_status st = tokens_alloc(m, v->n_tokens, blob_cap, err);
    if (st)
        return st;

    int16_t byte_of[BYTE_CODE_POINTS];
    build_byte_table(byte_of);
    size_t used = 0;
    for (int32_t id = 0; id < v->n_tokens; id++) {
        const cp_bpe_token *t = &v->tokens[id];
        if (t->len == 0)
            return load_fail(err, name, "%s[%d]: the token is empty, expected at least one byte; "
                             "%s", v->tokens_key, id, v->hint);
        if (t->kind != CP_BPE_TOKEN_NORMAL) {
            put_added_token(m, id, t->text, t->len, t->kind == CP_BPE_TOKEN_CONTROL, &used);
            added[(*n_added)++] = id;
            continue;
        }
        int32_t other = put_vocab_token(m, byte_of, id, t->text, t->len, &used);
        if (other >= 0)
            return load_fail(err, name, "%s[%d]: token \"%.*s\" repeats token %d, expected "
                             "each token once; %s", v->tokens_key, id,
                             (int)(t->len < 60 ? t->len : 60), t->text, other, v->hint);
    }
    return CP_OK;
}

/* Adds the merges of v in rank order. */
static cp_status put_vocab_merges(cp_bpe_model *m, const char *name, const cp_bpe_vocab *v,
                                  cp_error *err)
{
    char hint[256];
    snprintf(hint, sizeof hint, "; %s", v->hint);
    merge_source src = {.path = name, .hint = hint};
    build_byte_table(src.byte_of);
    cp_status st = merges_alloc(m, (size_t)v->n_merges, err);
    for (int32_t i = 0; !st && i < v->n_merges; i++) {
        snprintf(src.where, sizeof src.where, "%s[%d]", v->merges_key, i);
        st = add_merge_line(m, &src, v->merges[i].text, v->merges[i].len, err);
    }
    return st;
}

cp_status cp_bpe_build(const char *name, const cp_bpe_vocab *v, cp_bpe_model **out,
                       cp_error *err)
{
    *out = NULL;
    if (v->n_tokens <= 0 || v->n_tokens > MAX_TOKENS)
        return load_fail(err, name, "%s has %d tokens, expected 1 to %d; %s", v->tokens_key,
                         v->n_tokens, MAX_TOKENS, v->hint);
    CP_ASSERT(v->n_merges >= 0 && v->eos_id >= -1 && v->eos_id < v->n_tokens);
    cp_bpe_model *m = calloc(1, sizeof *m);
    int32_t *added = malloc((size_t)v->n_tokens * sizeof *added);
    int32_t n_added = 0;
    cp_status st = m && added ? CP_OK
                              : cp_error_nomem(err, "a tokenizer",
                                               sizeof *m + (size_t)v->n_tokens * sizeof *added);
    if (!st)
        st = put_vocab_tokens(m, name, v, added, &n_added, err);
    if (!st)
        st = index_tokens(m, added, n_added, err);
    if (!st && v->eos_id >= 0)
        m->eos_id = v->eos_id;
    if (!st && v->add_bos) {
        CP_ASSERT(v->bos_id >= 0 && v->bos_id < v->n_tokens);
        m->bos_id = v->bos_id;
    }
    if (!st) {
        m->pattern = v->pattern;
        m->ignore_merges = v->ignore_merges;
        st = put_vocab_merges(m, name, v, err);
    }
    free(added);
    if (st) {
        cp_bpe_free(m);
        return st;
    }
    *out = m;
    return CP_OK;
}

/* ---------------------------------------------------------------------- */
/* Encoding                                                               */
/* ---------------------------------------------------------------------- */

/* A candidate merge of the symbols at pos and next[pos], valid while both
 * still have the ids it was made from. */
typedef struct merge_candidate {
    int32_t rank;
    int32_t pos;
    int32_t left_id, right_id;
} merge_candidate;

/* Scratch space for merging one pre-token, grown to the longest one. */
typedef struct merge_state {
    const cp_bpe_model *m;
    size_t cap;             /* symbols the arrays can hold */
    int32_t *id;            /* cap: token id of the symbol at each byte, -1 once merged away */
    int32_t *next;          /* cap: position of the next live symbol, -1 at the end */
    int32_t *prev;          /* cap: position of the previous live symbol, -1 at the start */
    merge_candidate *heap;  /* 3 * cap: binary min-heap by (rank, pos) */
    size_t heap_len;
} merge_state;

static cp_status state_reserve(merge_state *s, size_t n, cp_error *err)
{
    if (n <= s->cap)
        return CP_OK;
    size_t cap = s->cap ? s->cap : 64;
    while (cap < n)
        cap *= 2;
    free(s->id);
    free(s->next);
    free(s->prev);
    free(s->heap);
    s->id = malloc(cap * sizeof *s->id);
    s->next = malloc(cap * sizeof *s->next);
    s->prev = malloc(cap * sizeof *s->prev);
    s->heap = malloc(3 * cap * sizeof *s->heap);
    s->cap = cap;
    if (!s->id || !s->next || !s->prev || !s->heap) {
        s->cap = 0;
        return cp_error_nomem(err, "BPE scratch space", cap * (12 + 3 * sizeof *s->heap));
    }
    return CP_OK;
}

static void state_free(merge_state *s)
{
    free(s->id);
    free(s->next);
    free(s->prev);
    free(s->heap);
}

static bool candidate_before(const merge_candidate *a, const merge_candidate *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

/* Pushes the merge of the symbols at left and next[left], if the merges
 * list has one. Each merge pushes at most two candidates and there are
 * fewer merges than symbols, so 3 * cap entries always suffice. */
static void push_candidate(merge_state *s, int32_t left)
{
    if (left < 0 || s->next[left] < 0)
        return;
    int32_t right = s->next[left];
    int32_t rank = lookup_merge(s->m, s->id[left], s->id[right]);
    if (rank < 0)
        return;
    size_t i = s->heap_len++;
    merge_candidate c = {rank, left, s->id[left], s->id[right]};
    while (i > 0 && candidate_before(&c, &s->heap[(i - 1) / 2])) {
        s->heap[i] = s->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    s->heap[i] = c;
}

static merge_candidate pop_candidate(merge_state *s)
{
    merge_candidate top = s->heap[0], last = s->heap[--s->heap_len];
    size_t i = 0, n = s->heap_len;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= n)
            break;
        if (child + 1 < n && candidate_before(&s->heap[child + 1], &s->heap[child]))
            child++;
        if (!candidate_before(&s->heap[child], &last))
            break;
        s->heap[i] = s->heap[child];
        i = child;
    }
    if (n)
        s->heap[i] = last;
    return top;
}

/* Applies merges to the n symbols at id[0..n) lowest rank first, leftmost
 * first among equal ranks, and appends the resulting ids to out. */
static void merge_pretoken(merge_state *s, size_t n, int32_t *out, size_t *n_out)
{
    s->heap_len = 0;
    for (size_t i = 0; i < n; i++) {
        s->prev[i] = (int32_t)i - 1;
        s->next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    for (size_t i = 0; i + 1 < n; i++)
        push_candidate(s, (int32_t)i);

    while (s->heap_len) {
        merge_candidate c = pop_candidate(s);
        int32_t right = s->next[c.pos];
        if (s->id[c.pos] != c.left_id || right < 0 || s->id[right] != c.right_id)
            continue; /* stale: one side was merged since */
        s->id[c.pos] = s->m->merge_result[c.rank];
        s->id[right] = -1;
        s->next[c.pos] = s->next[right];
        if (s->next[right] >= 0)
            s->prev[s->next[right]] = c.pos;
        push_candidate(s, s->prev[c.pos]);
        push_candidate(s, c.pos);
    }
    for (int32_t i = 0; i >= 0; i = s->next[i])
        out[(*n_out)++] = s->id[i];
}

/* Encodes text that contains no added token: pre-tokens, then merges. */
static cp_status encode_plain(merge_state *s, const char *text, size_t len, int32_t *out,
                              size_t *n_out, cp_error *err)
{
    const cp_bpe_model *m = s->m;
    for (size_t pos = 0; pos < len;) {
        size_t end = cp_bpe_pattern_pretoken_end(m->pattern, text, len, pos), n = end - pos;
        if (n > INT32_MAX)
            return cp_error_set(err, CP_ERR_INPUT,
                                "byte %zu of the text: a run of %zu bytes without a break is "
                                "too long to encode (the limit is 2 GiB)", pos, n);
        int32_t whole = m->ignore_merges ? lookup_token(m, text + pos, n) : -1;
        if (whole >= 0) {
            out[(*n_out)++] = whole;
            pos = end;
            continue;
        }
        cp_status st = state_reserve(s, n, err);
        if (st)
            return st;
        for (size_t i = 0; i < n; i++) {
            uint8_t byte = (uint8_t)text[pos + i];
            s->id[i] = m->byte_ids[byte];
            if (s->id[i] < 0)
                return cp_error_set(err, CP_ERR_INPUT,
                                    "byte %zu of the text: byte 0x%02X has no token in the "
                                    "vocabulary, so it cannot be encoded",
                                    pos + i, byte);
        }
        merge_pretoken(s, n, out, n_out);
        pos = end;
    }
    return CP_OK;
}

/* Returns the added token at text[pos], longest first, or -1. */
static int32_t match_added(const cp_bpe_model *m, const char *text, size_t len, size_t pos)
{
    uint8_t c = (uint8_t)text[pos];
    if (!(m->added_first[c / 8] & (1u << (c % 8))))
        return -1;
    for (int32_t i = 0; i < m->n_added; i++) {
        int32_t id = m->added_ids[i];
        uint32_t n = m->token_len[id];
        if (n <= len - pos && memcmp(text + pos, m->token_bytes + m->token_offset[id], n) == 0)
            return id;
    }
    return -1;
}

cp_status cp_bpe_encode(const cp_bpe_model *m, const char *text, size_t len, int32_t **ids,
                        size_t *n_ids, cp_error *err)
{
    *ids = NULL;
    *n_ids = 0;
    int32_t *out = malloc((len ? len : 1) * sizeof *out); /* at most one id per byte */
    if (!out)
        return cp_error_nomem(err, "token ids", len * sizeof *out);
    merge_state s = {.m = m};
    size_t n_out = 0, start = 0;
    cp_status st = CP_OK;
    for (size_t pos = 0; !st && pos <= len;) {
        int32_t added = pos < len && m->n_added ? match_added(m, text, len, pos) : -1;
        if (added < 0 && pos < len) {
            pos++;
            continue;
        }
        st = encode_plain(&s, text + start, pos - start, out, &n_out, err);
        if (added < 0)
            break;
        out[n_out++] = added;
        pos += m->token_len[added];
        start = pos;
    }
    state_free(&s);
    if (st) {
        free(out);
        return st;
    }
    *ids = out;
    *n_ids = n_out;
    return CP_OK;
}

/* ---------------------------------------------------------------------- */
/* Decoding                                                               */
/* ---------------------------------------------------------------------- */

cp_status cp_bpe_decode(const cp_bpe_model *m, const int32_t *ids, size_t n_ids, char **text,
                        size_t *len, cp_error *err)
{
    *text = NULL;
    *len = 0;
    size_t total = 0;
    for (size_t i = 0; i < n_ids; i++) {
        if (ids[i] < 0 || ids[i] >= m->n_tokens)
            return cp_error_set(err, CP_ERR_INPUT,
                                "token %zu: id %d is outside the vocabulary (0..%d)", i, ids[i],
                                m->n_tokens - 1);
        total += m->token_special[ids[i]] ? 0 : m->token_len[ids[i]];
    }
    char *out = malloc(total + 1);
    if (!out)
        return cp_error_nomem(err, "decoded text", total + 1);
    size_t n = 0;
    for (size_t i = 0; i < n_ids; i++) {
        if (m->token_special[ids[i]])
            continue;
        memcpy(out + n, m->token_bytes + m->token_offset[ids[i]], m->token_len[ids[i]]);
        n += m->token_len[ids[i]];
    }
    out[n] = '\0';
    *text = out;
    *len = n;
    return CP_OK;
}
